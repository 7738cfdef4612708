//! Cross-site work over the peer transport: the process's endpoint and runtime ([`net`]),
//! shipping chunks from pinned workers ([`ship`]), manifest lookup/commit and in-order chunk
//! fetch for restores ([`client`]), and the daemon's
//! side of all of it ([`serve`], with the Store stream's receiving end in [`receive`] and the
//! newest attempt of each peer job in [`attempts`]).

pub mod attempts;
pub mod client;
mod failure;
pub mod net;
mod receive;
pub mod serve;
pub mod ship;
