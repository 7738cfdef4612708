//! mover's peer transport.
//!
//! Today this crate holds the site identity: the private key and self-signed certificate that
//! `mover init` writes, and the certificate fingerprint by which peers pin each other (like SSH's
//! known_hosts). The sans-IO frame codec and session and the quinn glue land here with the
//! transport issue, so that everything a peer sees on the wire lives in one crate.

pub mod identity;
