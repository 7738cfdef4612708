//! A UDP socket for quinn whose segmentation-offload batches fit one send.
//!
//! quinn hands the kernel up to 10 datagrams of the path's MTU in one `sendmsg` (UDP GSO).
//! One send carries at most 65 507 bytes of UDP payload, so above ~6.5 KB datagrams the kernel
//! answers EMSGSIZE, quinn takes that for a failed MTU probe and the path falls back to 1200
//! bytes (../shared/MEASUREMENTS.md). Jumbo-frame fabrics (9000-byte MTU) are exactly where a
//! batch matters most, so instead of turning GSO off there this wrapper tells quinn how many
//! datagrams of the endpoint's own largest size fit one send (7 of 8952 bytes), and splits a
//! batch that is still too large (a connection of a shared endpoint whose peer allows larger
//! datagrams than the endpoint was made for) into sends that fit.

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
        let Some(segment) = transmit.segment_size else {
            return self.inner.try_send(transmit);
        };
        if transmit.contents.len() <= SEND_BYTES_MAX || segment == 0 {
            return self.inner.try_send(transmit);
        }
        // Whole datagrams per send; only the last send of a batch may end short.
        let per_send = (SEND_BYTES_MAX / segment).max(1) * segment;
        for (i, part) in transmit.contents.chunks(per_send).enumerate() {
            let sent = self.inner.try_send(&Transmit {
                destination: transmit.destination,
                ecn: transmit.ecn,
                contents: part,
                segment_size: (part.len() > segment).then_some(segment),
                src_ip: transmit.src_ip,
            });
            match sent {
                Ok(()) => {}
                // Nothing went out yet: quinn tries the whole batch again later.
                Err(e) if i == 0 => return Err(e),
                // Part of the batch went out: the rest is lost like any dropped datagram
                // (QUIC retransmits it); sending the whole batch again would duplicate it.
                Err(_) => return Ok(()),
            }
        }
        Ok(())
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
    use std::sync::Mutex;

    /// Records what would have been sent: (bytes, segment size) per send.
    #[derive(Debug, Default)]
    struct Recorder {
        sends: Mutex<Vec<(usize, Option<usize>)>>,
    }

    #[derive(Debug)]
    struct Ready;

    impl UdpPoller for Ready {
        fn poll_writable(self: Pin<&mut Self>, _: &mut Context) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncUdpSocket for Recorder {
        fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
            Box::pin(Ready)
        }
        fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
            assert!(transmit.contents.len() <= SEND_BYTES_MAX, "EMSGSIZE");
            let segment = transmit.segment_size;
            self.sends
                .lock()
                .unwrap()
                .push((transmit.contents.len(), segment));
            Ok(())
        }
        fn poll_recv(
            &self,
            _: &mut Context,
            _: &mut [io::IoSliceMut<'_>],
            _: &mut [RecvMeta],
        ) -> Poll<io::Result<usize>> {
            Poll::Pending
        }
        fn local_addr(&self) -> io::Result<SocketAddr> {
            Ok("127.0.0.1:1".parse().unwrap())
        }
        fn max_transmit_segments(&self) -> usize {
            64
        }
    }

    #[test]
    fn a_batch_larger_than_one_send_is_split_into_whole_datagrams() {
        let recorder = Arc::new(Recorder::default());
        // Made for Ethernet datagrams; a connection on it sends jumbo ones.
        let socket = SegmentCap::new(recorder.clone(), 1452);
        let contents = vec![0u8; 9 * 8952 + 100];
        socket
            .try_send(&Transmit {
                destination: "127.0.0.1:2".parse().unwrap(),
                ecn: None,
                contents: &contents,
                segment_size: Some(8952),
                src_ip: None,
            })
            .unwrap();
        let sends = recorder.sends.lock().unwrap().clone();
        assert_eq!(
            sends,
            vec![(7 * 8952, Some(8952)), (2 * 8952 + 100, Some(8952))]
        );
        // What fits goes out as it is.
        socket
            .try_send(&Transmit {
                destination: "127.0.0.1:2".parse().unwrap(),
                ecn: None,
                contents: &contents[..8952 + 10],
                segment_size: Some(8952),
                src_ip: None,
            })
            .unwrap();
        assert_eq!(recorder.sends.lock().unwrap()[2], (8962, Some(8952)));
    }

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
