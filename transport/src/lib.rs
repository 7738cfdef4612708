//! mover's peer transport.
//!
//! - [`identity`]: the site key and self-signed certificate `mover init` writes, and the
//!   fingerprint peers pin each other by (like SSH known_hosts).
//! - [`frame`]: the wire format. Every frame has a type and a length with a hard per-type bound
//!   checked from the header before any payload is buffered; decoders borrow and never panic.
//! - [`session`]: the protocol rules as pure state (have/want, credit, acks, manifest parts),
//!   in the shape of quinn-proto: frames in, decisions out, no sockets, no clocks.
//! - [`rate`]: the sender's token bucket for per-link bandwidth caps.
//! - [`bbr`]: quinn's BBR congestion controller with its start fixed (no ProbeRTT on the first
//!   full-rate acknowledgement).
//! - [`tls`] and [`quic`]: the glue. rustls with fingerprint-pinning verifiers on both sides
//!   (mutual TLS), quinn endpoints with the settings measured to matter, framed stream I/O;
//!   [`gso`]: the endpoints' UDP socket, its segmentation-offload batches capped to one send.

pub mod bbr;
pub mod frame;
pub mod gso;
pub mod identity;
pub mod quic;
pub mod rate;
pub mod session;
pub mod tls;

#[cfg(test)]
mod tests;
