//! A UDP socket for quinn whose segmentation-offload batches fit one send.
//!
//! quinn hands the kernel up to 10 datagrams of the path's MTU in one `sendmsg` (UDP GSO).
//! One send carries at most 65 507 bytes of UDP payload, so above ~6.5 KB datagrams the kernel
//! answers EMSGSIZE, quinn takes that for a failed MTU probe and the path falls back to 1200
//! bytes (../shared/MEASUREMENTS.md). Jumbo-frame fabrics (9000-byte MTU) are exactly where a
//! batch matters most, so instead of turning GSO off there this wrapper tells quinn how many
//! datagrams of the largest allowed size fit one send (7 of 8952 bytes).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

/// UDP payload one send may carry, all segments together (IPv4: 65 535 less the IP and UDP
/// headers; IPv6 allows 20 bytes more, not worth a second figure).
pub const SEND_BYTES_MAX: usize = 65_507;

/// Datagrams of up to `payload_bytes_max` bytes that fit one send (at least one).
pub fn segments_per_send(payload_bytes_max: u16) -> usize {
    (SEND_BYTES_MAX / usize::from(payload_bytes_max.max(1200))).max(1)
}

#[derive(Debug)]
pub struct SegmentCap {
    inner: Arc<dyn AsyncUdpSocket>,
    segments: usize,
}

impl SegmentCap {
    /// `payload_bytes_max`: the largest datagram this endpoint may send (MTU discovery's
    /// upper bound), so every batch quinn builds fits [`SEND_BYTES_MAX`].
    pub fn new(inner: Arc<dyn AsyncUdpSocket>, payload_bytes_max: u16) -> SegmentCap {
        SegmentCap {
            inner,
            segments: segments_per_send(payload_bytes_max),
        }
    }
}

impl AsyncUdpSocket for SegmentCap {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [io::IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments().min(self.segments)
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_fit_one_send() {
        assert_eq!(segments_per_send(1452), 45);
        assert_eq!(segments_per_send(8952), 7);
        assert_eq!(segments_per_send(32_000), 2);
        assert_eq!(segments_per_send(65_527), 1);
        for size in [1200u16, 1452, 6500, 8952, 9000, 16_384, 40_000] {
            assert!(segments_per_send(size) * usize::from(size) <= SEND_BYTES_MAX);
        }
    }
}
