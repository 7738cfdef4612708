//! Who may call the API: the `[api]` section checked against a connection's SO_PEERCRED
//! credentials (uid, gid and the process's supplementary groups), reloadable on SIGHUP.

use std::sync::{Arc, RwLock};

use crate::audit::Who;
use mover_config::ApiSection;

/// Who may call, reloadable on SIGHUP.
pub struct Access {
    section: RwLock<ApiSection>,
    daemon_uid: u32,
}

/// A connection's caller and the verdict on it, decided once when the connection is accepted
/// and handed to every request on it (as a request extension).
#[derive(Clone, Debug)]
pub struct Caller {
    pub who: Who,
    /// Why this caller may not use the daemon; `None` when it may.
    pub refusal: Option<Arc<str>>,
}

impl Access {
    pub fn new(section: ApiSection) -> Access {
        Access {
            section: RwLock::new(section),
            // SAFETY: geteuid has no preconditions.
            daemon_uid: unsafe { libc::geteuid() },
        }
    }

    pub fn replace(&self, section: ApiSection) {
        *self.section.write().unwrap_or_else(|e| e.into_inner()) = section;
    }

    /// The verdict on `who`, for the requests of one connection.
    pub fn caller(&self, who: Who) -> Caller {
        Caller {
            who,
            refusal: self.check(&who).err().map(Arc::from),
        }
    }

    /// `Err(reason)` for a caller the config does not allow.
    pub fn check(&self, caller: &Who) -> std::result::Result<(), String> {
        if caller.uid == 0 || caller.uid == self.daemon_uid {
            return Ok(());
        }
        let section = self.section.read().unwrap_or_else(|e| e.into_inner());
        if section.allowed_uids.contains(&caller.uid) {
            return Ok(());
        }
        if !section.allowed_gids.is_empty() {
            let mut groups = supplementary_groups(caller.pid);
            groups.push(caller.gid);
            if groups.iter().any(|g| section.allowed_gids.contains(g)) {
                return Ok(());
            }
        }
        Err(format!(
            "uid {} (gid {}) may not use this daemon: expected root, uid {}, or a uid/gid listed in [api] allowed_uids/allowed_gids",
            caller.uid, caller.gid, self.daemon_uid
        ))
    }
}

/// The caller process's supplementary groups (SO_PEERCRED carries only the primary one).
fn supplementary_groups(pid: i32) -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}
