//! quinn glue: endpoints with mover's transport settings, and framed reads and writes on
//! streams.
//!
//! The settings that matter were measured on this kind of machine (../shared/MEASUREMENTS.md):
//! the UDP payload size is worth ~4x (loopback and jumbo-frame fabrics carry 64 KiB datagrams),
//! and quinn's GSO batches must fit one send, or the EMSGSIZE that follows is silently taken
//! for a failed MTU probe ([`crate::gso`] caps them). Socket buffers are enlarged so bursts
//! are not dropped by the kernel.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use quinn::{Endpoint, EndpointConfig, TransportConfig, VarInt};

use crate::frame::{self, Frame, FrameError, Header, FRAME_HEADER_BYTES};
use crate::tls::{self, Cipher, SiteCredentials, TrustStore};

/// Per-link transport settings (from the peer's section of the config).
#[derive(Clone, Debug)]
pub struct LinkSettings {
    /// Largest UDP payload MTU discovery may climb to: 1452 for Ethernet WANs, 8952 for jumbo
    /// frames, 65527 on loopback.
    pub udp_payload_bytes_max: u16,
    pub stream_window_bytes: u32,
    pub connection_window_bytes: u32,
    pub send_window_bytes: u64,
    pub socket_buffer_bytes: usize,
    pub cipher: Cipher,
    pub idle_timeout: Duration,
    pub congestion: Congestion,
    /// Congestion window to start from; None: quinn's (about ten datagrams).
    pub initial_window_bytes: Option<u64>,
}

/// A link with a bandwidth cap starts its congestion window at this much time of the rate.
/// Quinn's default of ten datagrams needs ~9 round trips of startup to fill 1 Gbit/s at 50 ms
/// (~0.45 s at a fraction of the rate, BENCHMARKS.md run 4); the cap's token bucket, shared by
/// the link's connections, keeps the larger start from sending faster than the rate.
pub const INITIAL_WINDOW_TIME: Duration = Duration::from_millis(25);

/// Congestion control. Cubic (quinn's default) reads loss as congestion, so a path with
/// random loss (0.5% on a long WAN) caps it far below the link rate; BBR models bandwidth and
/// RTT instead and keeps such a link full. quinn marks its BBR as experimental.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Congestion {
    #[default]
    Cubic,
    Bbr,
}

impl std::str::FromStr for Congestion {
    type Err = String;
    fn from_str(s: &str) -> Result<Congestion, String> {
        match s {
            "cubic" => Ok(Congestion::Cubic),
            "bbr" => Ok(Congestion::Bbr),
            other => Err(format!(
                "congestion {other:?} is not known: expected cubic or bbr"
            )),
        }
    }
}

/// Quinn's own initial window for 1200-byte datagrams (14 720 bytes) rounded up: a start below
/// it is ignored.
const INITIAL_WINDOW_FLOOR: u64 = 16 * 1024;

impl LinkSettings {
    /// Defaults for a link to `address`: loopback gets loopback's 64 KiB datagrams and cubic;
    /// anything else Ethernet's datagrams and BBR, since cubic moves under 1% of a long link
    /// with 0.5% random loss (BENCHMARKS.md, WAN).
    pub fn for_address(address: &SocketAddr) -> LinkSettings {
        let loopback = address.ip().is_loopback();
        LinkSettings {
            udp_payload_bytes_max: if loopback { 65527 } else { 1452 },
            stream_window_bytes: 16 << 20,
            connection_window_bytes: 32 << 20,
            send_window_bytes: 32 << 20,
            socket_buffer_bytes: 32 << 20,
            cipher: Cipher::Aes128,
            idle_timeout: Duration::from_secs(10),
            congestion: if loopback {
                Congestion::Cubic
            } else {
                Congestion::Bbr
            },
            initial_window_bytes: None,
        }
    }

    /// For a link capped at `bytes_per_second`: the congestion window starts at
    /// [`INITIAL_WINDOW_TIME`] of the rate (never below quinn's own start).
    pub fn start_at_rate(&mut self, bytes_per_second: u64) {
        let bytes = bytes_per_second as u128 * INITIAL_WINDOW_TIME.as_nanos() / 1_000_000_000;
        self.initial_window_bytes = Some(bytes.min(u64::MAX as u128) as u64);
    }

    fn transport(&self) -> TransportConfig {
        let mut t = TransportConfig::default();
        t.max_idle_timeout(Some(
            self.idle_timeout
                .try_into()
                .expect("idle timeout fits a QUIC varint"),
        ));
        t.keep_alive_interval(Some(self.idle_timeout / 4));
        t.stream_receive_window(VarInt::from_u32(self.stream_window_bytes));
        t.receive_window(VarInt::from_u32(self.connection_window_bytes));
        t.send_window(self.send_window_bytes);
        t.max_concurrent_bidi_streams(VarInt::from_u32(8));
        t.max_concurrent_uni_streams(VarInt::from_u32(0));
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(self.udp_payload_bytes_max);
        t.mtu_discovery_config(Some(mtu));
        // Batches are capped to one send's worth by the endpoint's socket (`gso::SegmentCap`).
        t.enable_segmentation_offload(true);
        // Quinn's default start (about ten datagrams of the path's MTU) unless a larger one
        // was asked for.
        let initial_window = self
            .initial_window_bytes
            .filter(|&w| w > INITIAL_WINDOW_FLOOR);
        match self.congestion {
            Congestion::Bbr => match initial_window {
                // A capped link: our BBR, whose start does not throw the larger window away.
                Some(window) => {
                    let mut bbr = crate::bbr::BbrConfig::default();
                    bbr.initial_window(window);
                    t.congestion_controller_factory(Arc::new(bbr));
                }
                // Uncapped, quinn's own. Its early ProbeRTT (see `bbr`) restarts startup
                // after the first round trip from four datagrams; without it, startup from
                // ten datagrams overshot the 50 ms / 0.5% loss path's queue and the link was
                // half used for the rest of the transfer (46% against 77%, BENCHMARKS.md run
                // 4), so the fix is only taken where the cap's token bucket bounds the start.
                None => {
                    t.congestion_controller_factory(Arc::new(
                        quinn::congestion::BbrConfig::default(),
                    ));
                }
            },
            Congestion::Cubic => {
                if let Some(window) = initial_window {
                    let mut cubic = quinn::congestion::CubicConfig::default();
                    cubic.initial_window(window);
                    t.congestion_controller_factory(Arc::new(cubic));
                }
            }
        }
        t
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("UDP socket {address}: {source}")]
    Socket {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("connecting to {site} at {address}: {detail}")]
    Connect {
        site: String,
        address: SocketAddr,
        detail: String,
        failure: ConnectFailure,
    },
}

/// Why a connection attempt failed, so the caller can say what to do and decide on a retry
/// without reading the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    /// The peer's TLS refused our certificate: it does not pin this site's fingerprint.
    NotTrusted,
    /// Nothing answered in time, or the peer reset or closed the connection: passes once the
    /// peer is back.
    Unreachable,
    /// Anything else (we refused the peer's certificate, a local setup error).
    Other,
}

impl ConnectFailure {
    /// Judges a connection error (from connecting, or a connection's close reason).
    pub fn of(e: &quinn::ConnectionError) -> ConnectFailure {
        use quinn::ConnectionError as E;
        match e {
            E::ConnectionClosed(close) => {
                let code = u64::from(close.error_code);
                // TLS alerts ride in QUIC's crypto error range (RFC 9001 §4.8): 0x100 + alert.
                let alert = code.checked_sub(0x100).filter(|a| *a <= 0xff);
                match alert {
                    // bad/unsupported/revoked/expired/unknown certificate, unknown CA, access
                    // denied, certificate required: the peer's verifier said no to us.
                    Some(42..=46 | 48 | 49 | 116) => ConnectFailure::NotTrusted,
                    Some(_) => ConnectFailure::Other,
                    None => ConnectFailure::Unreachable,
                }
            }
            // A daemon that no longer trusts us (its peers were reloaded) closes with this.
            E::ApplicationClosed(c) if c.error_code == VarInt::from_u32(close::NOT_A_PEER) => {
                ConnectFailure::NotTrusted
            }
            E::TimedOut | E::Reset | E::ApplicationClosed(_) => ConnectFailure::Unreachable,
            _ => ConnectFailure::Other,
        }
    }
}

/// Application close codes (the QUIC CONNECTION_CLOSE code a peer reads to learn why).
pub mod close {
    /// The work is done (also what a peer that does not know the codes below sends).
    pub const DONE: u32 = 0;
    /// The certificate is not (or no longer) a configured peer's.
    pub const NOT_A_PEER: u32 = 2;
    /// The daemon is stopping: try again once it is back.
    pub const SHUTTING_DOWN: u32 = 3;
}

fn udp_socket(address: SocketAddr, buffer_bytes: usize) -> Result<UdpSocket, QuicError> {
    let socket =
        UdpSocket::bind(address).map_err(|source| QuicError::Socket { address, source })?;
    set_buffers(&socket, buffer_bytes);
    Ok(socket)
}

/// Large socket buffers: as root the FORCE variants bypass net.core.{r,w}mem_max; otherwise
/// the kernel caps the request at those sysctls (raise them on real nodes; see the README).
fn set_buffers(socket: &UdpSocket, bytes: usize) {
    use std::os::fd::AsRawFd;
    let value = bytes.min(i32::MAX as usize) as libc::c_int;
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        for option in [force, plain] {
            // SAFETY: setsockopt on a descriptor we own with a c_int value of the right size.
            let rc = unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    option,
                    &value as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc == 0 {
                break;
            }
        }
    }
}

fn endpoint_config(settings: &LinkSettings) -> EndpointConfig {
    let mut config = EndpointConfig::default();
    config
        .max_udp_payload_size(settings.udp_payload_bytes_max)
        .expect("payload size within QUIC's bounds");
    config
}

/// A listening endpoint that accepts the peers in `trust`. Must run inside a tokio runtime.
pub fn server(
    listen: SocketAddr,
    credentials: &SiteCredentials,
    trust: TrustStore,
    settings: &LinkSettings,
) -> Result<Endpoint, QuicError> {
    let crypto = tls::server_config(credentials, trust)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(settings.transport()));
    let socket = udp_socket(listen, settings.socket_buffer_bytes)?;
    // Accept datagrams as large as any client may send (jumbo or loopback paths); what we
    // send is still bounded by `settings` and what MTU discovery finds.
    let mut accept = settings.clone();
    accept.udp_payload_bytes_max = 65527;
    endpoint(
        endpoint_config(&accept),
        Some(server),
        socket,
        settings.udp_payload_bytes_max,
    )
    .map_err(|source| QuicError::Socket {
        address: listen,
        source,
    })
}

/// An endpoint on `socket` whose send batches fit one send for datagrams of up to
/// `payload_bytes_max` (MTU discovery's upper bound: nothing larger is sent).
fn endpoint(
    config: EndpointConfig,
    server: Option<quinn::ServerConfig>,
    socket: UdpSocket,
    payload_bytes_max: u16,
) -> std::io::Result<Endpoint> {
    use quinn::Runtime;
    let runtime = Arc::new(quinn::TokioRuntime);
    let socket = runtime.wrap_udp_socket(socket)?;
    let socket = Arc::new(crate::gso::SegmentCap::new(socket, payload_bytes_max));
    Endpoint::new_with_abstract_socket(config, server, socket, runtime)
}

/// Connects to `site` at `address`, which must present `expected`, from a client endpoint of
/// its own (a worker's, so each worker thread has its own socket and connection, driven on
/// its own core). The endpoint closes with the connection ([`hang_up`]).
pub async fn connect(
    credentials: &SiteCredentials,
    site: &str,
    address: SocketAddr,
    expected: crate::identity::Fingerprint,
    settings: &LinkSettings,
) -> Result<(Endpoint, quinn::Connection), QuicError> {
    let config = client_config(credentials, site, expected, settings)?;
    let endpoint = client_endpoint(address, settings)?;
    let connection = connect_on(&endpoint, config, site, address).await?;
    Ok((endpoint, connection))
}

/// A client endpoint able to reach `address` (bound to any address of its family), whose
/// send batches fit one send for `settings`' datagrams. Must run inside a tokio runtime.
pub fn client_endpoint(
    address: SocketAddr,
    settings: &LinkSettings,
) -> Result<Endpoint, QuicError> {
    let bind: SocketAddr = if address.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let socket = udp_socket(bind, settings.socket_buffer_bytes)?;
    // Accept datagrams as large as any peer may send, as a server does: a shared endpoint's
    // connections have different peers.
    let mut accept = settings.clone();
    accept.udp_payload_bytes_max = 65527;
    endpoint(
        endpoint_config(&accept),
        None,
        socket,
        settings.udp_payload_bytes_max,
    )
    .map_err(|source| QuicError::Socket {
        address: bind,
        source,
    })
}

/// What a connection to `site` uses: mutual TLS pinning `expected`, and `settings`.
pub fn client_config(
    credentials: &SiteCredentials,
    site: &str,
    expected: crate::identity::Fingerprint,
    settings: &LinkSettings,
) -> Result<quinn::ClientConfig, QuicError> {
    let crypto = tls::client_config(credentials, site, expected, settings.cipher)?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(settings.transport()));
    Ok(client)
}

/// Connects to `site` at `address` from `endpoint` (a process's shared one, a daemon's
/// server endpoint included: its socket sends and receives for every connection on it).
pub async fn connect_on(
    endpoint: &Endpoint,
    config: quinn::ClientConfig,
    site: &str,
    address: SocketAddr,
) -> Result<quinn::Connection, QuicError> {
    let fail = |detail: String, failure| QuicError::Connect {
        site: site.to_string(),
        address,
        detail,
        failure,
    };
    let connecting = endpoint
        .connect_with(config, address, &format!("{site}.mover"))
        .map_err(|e| fail(e.to_string(), ConnectFailure::Other))?;
    connecting
        .await
        .map_err(|e| fail(e.to_string(), ConnectFailure::of(&e)))
}

/// How long a closing side keeps its endpoint turning so the CONNECTION_CLOSE leaves the
/// socket (one poll of the driver suffices; this bounds it on a busy core).
const CLOSE_GRACE: Duration = Duration::from_millis(5);

/// Closes a connection whose work is done and acknowledged at the application level, without
/// waiting out the draining period. `Endpoint::wait_idle` lasts 3 PTO, which a busy loopback
/// inflates to tens of milliseconds and a WAN to hundreds; on every job's path between its
/// stages that was 10-25% of a loopback backup. A close lost here costs nothing but the peer's
/// idle timeout: nothing unacknowledged is outstanding.
pub async fn hang_up(endpoint: &Endpoint, connection: &quinn::Connection) {
    close_done(connection);
    let _ = tokio::time::timeout(CLOSE_GRACE, endpoint.wait_idle()).await;
}

/// Closes a finished connection of a shared endpoint: the endpoint's driver, which keeps
/// running for the other connections, sends the close.
pub fn close_done(connection: &quinn::Connection) {
    connection.close(VarInt::from_u32(close::DONE), b"done");
}

/// Why reading a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("stream closed by the peer")]
    Finished,
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("{0}")]
    Stream(String),
}

/// Reads frames from a stream into one reusable buffer, never larger than the biggest frame.
pub struct FrameReader {
    stream: quinn::RecvStream,
    /// Grown to the largest frame seen and never shrunk: resizing it to each frame's length
    /// zero-filled the difference whenever a chunk followed a smaller frame (about half of a
    /// receiver's chunks), a pass over memory that the read then overwrote.
    buf: Vec<u8>,
}

impl FrameReader {
    pub fn new(stream: quinn::RecvStream) -> FrameReader {
        FrameReader {
            stream,
            buf: Vec::new(),
        }
    }

    /// The next frame; the header is checked before its payload is read.
    pub async fn next(&mut self) -> Result<Frame<'_>, ReadError> {
        let header = self.header().await?;
        self.body(header).await
    }

    /// The next frame, with a Chunk's payload left in the pieces quinn received it in (no
    /// copy, and owned, so it can be handed to another thread). Other frames as [`next`].
    ///
    /// [`next`]: FrameReader::next
    pub async fn next_piecewise(&mut self) -> Result<Piecewise<'_>, ReadError> {
        let header = self.header().await?;
        if header.kind != frame::CHUNK_KIND {
            return Ok(Piecewise::Frame(self.body(header).await?));
        }
        let Some(payload_len) = header.len.checked_sub(frame::CHUNK_FIELDS_BYTES) else {
            return Err(FrameError::Malformed {
                kind: "Chunk",
                detail: "payload shorter than its fields",
            }
            .into());
        };
        let mut fields = [0u8; frame::CHUNK_FIELDS_BYTES];
        self.stream
            .read_exact(&mut fields)
            .await
            .map_err(inside_frame)?;
        let id: [u8; 32] = fields[..32].try_into().expect("32 bytes");
        let codec = fields[32];
        let raw_len = u32::from_le_bytes(fields[33..37].try_into().expect("4 bytes"));
        frame::check_chunk_fields(codec, raw_len, payload_len)?;
        // A piece keeps quinn's whole receive buffer alive, so small pieces are copied
        // together: a peer sending a chunk as 1-byte STREAM frames would otherwise make us
        // hold a datagram per byte. What a chunk holds is then ≤ its payload plus the
        // buffers behind ≤ payload / PIECE_BYTES_KEPT large pieces.
        let mut pieces = Vec::new();
        let mut small = bytes::BytesMut::new();
        let mut left = payload_len;
        while left > 0 {
            let piece = self
                .stream
                .read_chunk(left, true)
                .await
                .map_err(|e| ReadError::Stream(e.to_string()))?
                .ok_or_else(|| ReadError::Stream("stream ended inside a frame".into()))?
                .bytes;
            debug_assert!(piece.len() <= left);
            left -= piece.len();
            if piece.len() >= PIECE_BYTES_KEPT {
                if !small.is_empty() {
                    pieces.push(small.split().freeze());
                }
                pieces.push(piece);
            } else {
                if small.capacity() == 0 {
                    small.reserve(left + piece.len());
                }
                small.extend_from_slice(&piece);
            }
        }
        if !small.is_empty() {
            pieces.push(small.freeze());
        }
        Ok(Piecewise::Chunk(ChunkPieces {
            id,
            codec,
            raw_len,
            pieces,
            len: payload_len,
        }))
    }

    async fn header(&mut self) -> Result<Header, ReadError> {
        let mut header = [0u8; FRAME_HEADER_BYTES];
        match self.stream.read_exact(&mut header).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => return Err(ReadError::Finished),
            // A peer that closes its connection normally (code 0) between frames is done too.
            Err(quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(
                quinn::ConnectionError::ApplicationClosed(close),
            ))) if close.error_code == VarInt::from_u32(0) => return Err(ReadError::Finished),
            Err(quinn::ReadExactError::FinishedEarly(_)) => {
                return Err(ReadError::Stream(
                    "stream ended inside a frame header".into(),
                ))
            }
            Err(quinn::ReadExactError::ReadError(e)) => {
                return Err(ReadError::Stream(e.to_string()))
            }
        }
        Ok(Header::decode(&header)?)
    }

    async fn body(&mut self, header: Header) -> Result<Frame<'_>, ReadError> {
        if self.buf.len() < header.len {
            self.buf.resize(header.len, 0);
        }
        let body = &mut self.buf[..header.len];
        self.stream.read_exact(body).await.map_err(inside_frame)?;
        Ok(frame::decode(header, &self.buf[..header.len])?)
    }

    pub fn stop(&mut self, code: u32) {
        let _ = self.stream.stop(VarInt::from_u32(code));
    }
}

/// Received pieces of a chunk at least this large are kept as quinn delivered them (loopback
/// and jumbo paths); smaller ones (Ethernet-sized datagrams) are copied into one buffer.
const PIECE_BYTES_KEPT: usize = 16 * 1024;

fn inside_frame(e: quinn::ReadExactError) -> ReadError {
    match e {
        quinn::ReadExactError::FinishedEarly(_) => {
            ReadError::Stream("stream ended inside a frame".into())
        }
        quinn::ReadExactError::ReadError(e) => ReadError::Stream(e.to_string()),
    }
}

/// What [`FrameReader::next_piecewise`] read.
pub enum Piecewise<'a> {
    Chunk(ChunkPieces),
    Frame(Frame<'a>),
}

/// A Chunk frame whose payload stays in quinn's received buffers (small pieces copied
/// together, see `PIECE_BYTES_KEPT`). Its fields passed
/// [`frame::check_chunk_fields`]; `len` is the payload's length (≤ 4 MiB), the sum of the
/// pieces' lengths.
#[derive(Debug)]
pub struct ChunkPieces {
    pub id: [u8; 32],
    pub codec: u8,
    pub raw_len: u32,
    pub pieces: Vec<bytes::Bytes>,
    pub len: usize,
}

/// Encodes and writes frames; reuses one buffer for small frames.
pub struct FrameWriter {
    stream: quinn::SendStream,
    buf: Vec<u8>,
}

impl FrameWriter {
    pub fn new(stream: quinn::SendStream) -> FrameWriter {
        FrameWriter {
            stream,
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, frame: &Frame<'_>) -> Result<(), quinn::WriteError> {
        self.buf.clear();
        frame::encode(frame, &mut self.buf);
        self.stream.write_all(&self.buf).await
    }

    /// Sends a chunk frame whose payload is already a `Bytes` (no copy here; quinn keeps it
    /// until acknowledged).
    pub async fn send_chunk(
        &mut self,
        id: &[u8; 32],
        codec: u8,
        raw_len: u32,
        payload: bytes::Bytes,
    ) -> Result<(), quinn::WriteError> {
        let prefix = frame::chunk_frame_prefix(id, codec, raw_len, payload.len());
        self.stream
            .write_all_chunks(&mut [bytes::Bytes::copy_from_slice(&prefix), payload])
            .await
    }

    /// Sends a BenchData frame whose payload is already a `Bytes` (no copy: one filler buffer
    /// serves every frame of a bench).
    pub async fn send_bench_data(
        &mut self,
        payload: bytes::Bytes,
    ) -> Result<(), quinn::WriteError> {
        let header = frame::bench_data_header(payload.len());
        self.stream
            .write_all_chunks(&mut [bytes::Bytes::copy_from_slice(&header), payload])
            .await
    }

    /// Closes our side after the peer read everything sent.
    pub fn finish(&mut self) {
        let _ = self.stream.finish();
    }

    pub fn reset(&mut self, code: u32) {
        let _ = self.stream.reset(VarInt::from_u32(code));
    }
}

/// The fingerprint of the certificate the peer presented on this connection.
pub fn peer_fingerprint(connection: &quinn::Connection) -> Option<crate::identity::Fingerprint> {
    let identity = connection.peer_identity()?;
    let certificates = identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    certificates
        .first()
        .map(|der| crate::identity::Fingerprint::of_der(der))
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn::{ApplicationClose, ConnectionClose, ConnectionError, TransportErrorCode};

    fn aborted(code: TransportErrorCode) -> ConnectionError {
        ConnectionError::ConnectionClosed(ConnectionClose {
            error_code: code,
            frame_type: None,
            reason: bytes::Bytes::new(),
        })
    }

    fn closed(code: u32) -> ConnectionError {
        ConnectionError::ApplicationClosed(ApplicationClose {
            error_code: VarInt::from_u32(code),
            reason: bytes::Bytes::new(),
        })
    }

    #[test]
    fn connect_failures_are_judged_by_their_codes() {
        // rustls answers a refused client certificate with access_denied (49).
        let judged = |e| ConnectFailure::of(&e);
        assert_eq!(
            judged(aborted(TransportErrorCode::crypto(49))),
            ConnectFailure::NotTrusted
        );
        assert_eq!(
            judged(aborted(TransportErrorCode::crypto(40))),
            ConnectFailure::Other
        );
        assert_eq!(
            judged(closed(close::NOT_A_PEER)),
            ConnectFailure::NotTrusted
        );
        assert_eq!(
            judged(closed(close::SHUTTING_DOWN)),
            ConnectFailure::Unreachable
        );
        assert_eq!(
            judged(ConnectionError::TimedOut),
            ConnectFailure::Unreachable
        );
        assert_eq!(
            judged(ConnectionError::LocallyClosed),
            ConnectFailure::Other
        );
    }
}
