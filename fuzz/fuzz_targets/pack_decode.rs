//! Pack bytes come from disk: record headers, payloads, footers and trailers must reject any
//! damage without panicking or allocating beyond the chunk bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mover::format::pack;

fuzz_target!(|data: &[u8]| {
    let _ = pack::check_pack_header(data);
    let body = data.get(pack::PACK_HEADER_BYTES..).unwrap_or(&[]);
    if let Ok(header) = pack::RecordHeader::decode(body) {
        let payload = &body[pack::RECORD_HEADER_BYTES..];
        let payload = &payload[..payload.len().min(header.stored_len as usize)];
        let mut out = Vec::new();
        if pack::open_record(&header, payload, &mut out).is_ok() {
            assert_eq!(out.len(), header.raw_len as usize);
        }
    }
    if data.len() >= pack::TRAILER_BYTES {
        let trailer = &data[data.len() - pack::TRAILER_BYTES..];
        if let Ok((entries, footer_offset, checksum)) = pack::decode_trailer(trailer, data.len() as u64) {
            let start = footer_offset as usize;
            let end = data.len() - pack::TRAILER_BYTES;
            if let Ok(decoded) = pack::decode_footer(&data[start..end], checksum) {
                assert_eq!(decoded.len(), entries as usize);
            }
        }
    }
});
