//! Cross-site work over the peer transport: shipping chunks from pinned workers ([`ship`]),
//! manifest lookup/commit and in-order chunk fetch for restores ([`client`]), and the daemon's
//! side of all of it ([`serve`]).

pub mod client;
pub mod serve;
pub mod ship;
