//! The embedded broker's authentication against the device registry.
//!
//! Per CONNECT: the username names a device, the client id must be that device's
//! ([`registry::client_id_allowed`]), and the password must match its argon2id hash. The
//! registry file is re-read when it changes (inode, size or mtime), so `pickupctl device
//! add|remove|rotate` apply to the next CONNECT without a restart; a file that became
//! unreadable keeps the last good registry in force and is logged.
//!
//! argon2 is slow on purpose (tens of milliseconds, 7 MiB). So that a reconnect storm
//! does not burn the CPU or the memory:
//! - a successful check is remembered, keyed by device id and a SHA-256 of the password,
//!   and valid only while the device's stored hash is unchanged (rotation or removal
//!   forgets it);
//! - a failed check is remembered for [`FAILURE_TTL`], so a device retrying with an old
//!   secret costs one argon2 run per period, not one per attempt;
//! - only one argon2 verification runs at a time.
//!
//! Both caches are bounded and cleared when full.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pickup_broker::AuthHook;

use super::registry::{self, file_stamp, Registry, RegistryError, Role};

/// How long a failed (device, password) pair is refused without running argon2 again.
pub const FAILURE_TTL: Duration = Duration::from_secs(30);
/// Entries per cache before it is cleared.
const CACHE_MAX: usize = 4096;

type Stamp = Option<(u64, u64, i64, i64)>;
type Key = (String, [u8; 32]);

/// Why a CONNECT was refused (for the log; the client only sees the connection close).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No username.
    NoUser,
    /// The username is not in the registry.
    UnknownDevice,
    /// The client id is not the one bound to this device.
    WrongClientId,
    /// The password does not match.
    WrongSecret,
}

impl Refusal {
    fn as_str(self) -> &'static str {
        match self {
            Refusal::NoUser => "no username",
            Refusal::UnknownDevice => "unknown device",
            Refusal::WrongClientId => "client id not bound to this device",
            Refusal::WrongSecret => "wrong secret",
        }
    }
}

struct Loaded {
    registry: Arc<Registry>,
    stamp: Stamp,
}

/// Counters, for tests and the status line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AuthCounts {
    /// argon2 verifications run.
    pub argon2_runs: u64,
    /// Connects allowed from the success cache.
    pub cache_hits: u64,
    /// Connects refused.
    pub refused: u64,
    /// Registry reloads after a change.
    pub reloads: u64,
}

/// Registry-backed authentication; cheap to share (`Arc`).
pub struct DeviceAuth {
    path: PathBuf,
    loaded: Mutex<Loaded>,
    ok_cache: Mutex<HashMap<Key, String>>,
    failed: Mutex<HashMap<Key, (String, Instant)>>,
    verify_one: Mutex<()>,
    /// The daemon's own identity for this run: id and secret, checked without the
    /// registry, so the daemon's link never depends on the file.
    pinned: Option<(String, String)>,
    counts: Mutex<AuthCounts>,
}

impl DeviceAuth {
    /// Loads the registry at `path` (missing: empty; unreadable: error).
    pub fn new(path: &Path, pinned: Option<(String, String)>) -> Result<Arc<Self>, RegistryError> {
        let stamp = file_stamp(path);
        let registry = Registry::load(path)?;
        Ok(Arc::new(Self {
            path: path.to_path_buf(),
            loaded: Mutex::new(Loaded {
                registry: Arc::new(registry),
                stamp,
            }),
            ok_cache: Mutex::default(),
            failed: Mutex::default(),
            verify_one: Mutex::default(),
            pinned,
            counts: Mutex::default(),
        }))
    }

    /// The hook for [`pickup_broker::BrokerConfig::auth_hook`].
    pub fn hook(self: &Arc<Self>) -> AuthHook {
        let me = self.clone();
        Arc::new(move |client_id: &str, user: &str, pass: &str| {
            match me.check(client_id, user, pass) {
                Ok(role) => {
                    tracing::debug!(client_id, device = user, %role, "device authenticated");
                    true
                }
                Err(r) => {
                    if let Ok(mut c) = me.counts.lock() {
                        c.refused += 1;
                    }
                    tracing::warn!(
                        client_id,
                        device = user,
                        reason = r.as_str(),
                        "connection refused"
                    );
                    false
                }
            }
        })
    }

    /// Counters so far.
    pub fn counts(&self) -> AuthCounts {
        self.counts.lock().map(|c| *c).unwrap_or_default()
    }

    /// The registry in force (re-read first if the file changed).
    pub fn registry(&self) -> Arc<Registry> {
        let stamp = file_stamp(&self.path);
        let Ok(mut l) = self.loaded.lock() else {
            return Arc::new(Registry::default());
        };
        if stamp != l.stamp {
            match Registry::load(&self.path) {
                Ok(r) => {
                    tracing::info!(path = %self.path.display(), devices = r.len(), "device registry reloaded");
                    l.registry = Arc::new(r);
                    l.stamp = stamp;
                    if let Ok(mut c) = self.counts.lock() {
                        c.reloads += 1;
                    }
                }
                Err(e) => {
                    // Keep the last good registry; log once per change of the file.
                    tracing::error!(error = %e, "device registry unreadable; the previous version stays in force");
                    l.stamp = stamp;
                }
            }
        }
        l.registry.clone()
    }

    /// Decides one CONNECT; `Ok` carries the device's role.
    pub fn check(&self, client_id: &str, user: &str, pass: &str) -> Result<Role, Refusal> {
        if user.is_empty() {
            return Err(Refusal::NoUser);
        }
        if let Some((id, secret)) = &self.pinned {
            // The daemon's own identity, or its status-read connection's.
            if user == id || user.strip_suffix(registry::READS_SUFFIX) == Some(id.as_str()) {
                return if client_id != user {
                    Err(Refusal::WrongClientId)
                } else if ct_eq(pass.as_bytes(), secret.as_bytes()) {
                    Ok(Role::Daemon)
                } else {
                    Err(Refusal::WrongSecret)
                };
            }
        }
        let reg = self.registry();
        let dev = match reg.get(user) {
            Some(d) => d,
            // A daemon's status-read connection: the daemon's secret, its own client id.
            None => {
                let base = user
                    .strip_suffix(registry::READS_SUFFIX)
                    .and_then(|b| reg.get(b))
                    .filter(|d| d.role == Role::Daemon)
                    .ok_or(Refusal::UnknownDevice)?;
                if client_id != user {
                    return Err(Refusal::WrongClientId);
                }
                base
            }
        };
        if dev.id == user && !registry::client_id_allowed(dev.role, &dev.id, client_id) {
            return Err(Refusal::WrongClientId);
        }
        let key: Key = (dev.id.clone(), sha256(pass));
        if self
            .ok_cache
            .lock()
            .ok()
            .is_some_and(|c| c.get(&key) == Some(&dev.secret_hash))
        {
            if let Ok(mut c) = self.counts.lock() {
                c.cache_hits += 1;
            }
            return Ok(dev.role);
        }
        if let Ok(f) = self.failed.lock() {
            if let Some((hash, at)) = f.get(&key) {
                if *hash == dev.secret_hash && at.elapsed() < FAILURE_TTL {
                    return Err(Refusal::WrongSecret);
                }
            }
        }
        let ok = {
            let _one = self.verify_one.lock();
            if let Ok(mut c) = self.counts.lock() {
                c.argon2_runs += 1;
            }
            registry::verify_secret(pass, &dev.secret_hash)
        };
        if ok {
            if let Ok(mut c) = self.ok_cache.lock() {
                if c.len() >= CACHE_MAX {
                    c.clear();
                }
                c.insert(key, dev.secret_hash.clone());
            }
            Ok(dev.role)
        } else {
            if let Ok(mut f) = self.failed.lock() {
                if f.len() >= CACHE_MAX {
                    f.clear();
                }
                f.insert(key, (dev.secret_hash.clone(), Instant::now()));
            }
            Err(Refusal::WrongSecret)
        }
    }
}

fn sha256(s: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Compares secrets without an early exit on the first differing byte.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_client_ids_caches_successes_and_follows_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.json");
        let mut r = Registry::default();
        let s_k1 = r.add("k1", Role::Kiosk, 0).unwrap();
        let s_c1 = r.add("c1", Role::Courier, 0).unwrap();
        let s_d2 = r.add("d2", Role::Daemon, 0).unwrap();
        r.save(&path).unwrap();
        let auth = DeviceAuth::new(&path, Some(("pickupd".into(), "own".into()))).unwrap();

        assert_eq!(auth.check("kiosk-k1", "k1", &s_k1), Ok(Role::Kiosk));
        assert_eq!(auth.check("kiosk-k1", "k1", &s_k1), Ok(Role::Kiosk));
        assert_eq!(
            auth.counts().argon2_runs,
            1,
            "second connect served from the cache"
        );
        assert_eq!(auth.counts().cache_hits, 1);
        assert_eq!(
            auth.check("courier-k1", "k1", &s_k1),
            Err(Refusal::WrongClientId)
        );
        assert_eq!(
            auth.check("kiosk-k1", "k1", &s_c1),
            Err(Refusal::WrongSecret)
        );
        assert_eq!(
            auth.check("kiosk-k1", "k1", &s_c1),
            Err(Refusal::WrongSecret)
        );
        assert_eq!(
            auth.counts().argon2_runs,
            2,
            "a repeated failure does not run argon2"
        );
        assert_eq!(
            auth.check("kiosk-zz", "zz", "x"),
            Err(Refusal::UnknownDevice)
        );
        assert_eq!(auth.check("kiosk-k1", "", ""), Err(Refusal::NoUser));
        assert_eq!(auth.check("pickupd", "pickupd", "own"), Ok(Role::Daemon));
        assert_eq!(
            auth.check("pickupd", "pickupd", "other"),
            Err(Refusal::WrongSecret)
        );
        assert_eq!(
            auth.check("x", "pickupd", "own"),
            Err(Refusal::WrongClientId)
        );
        // The daemon's status-read connection: same secret, its own client id.
        assert_eq!(
            auth.check("pickupd.reads", "pickupd.reads", "own"),
            Ok(Role::Daemon)
        );
        assert_eq!(
            auth.check("pickupd", "pickupd.reads", "own"),
            Err(Refusal::WrongClientId)
        );
        assert_eq!(
            auth.check("pickupd.reads", "pickupd.reads", "other"),
            Err(Refusal::WrongSecret)
        );
        assert_eq!(
            auth.check("k1.reads", "k1.reads", &s_k1),
            Err(Refusal::UnknownDevice),
            "only a daemon identity has a read identity"
        );
        assert_eq!(
            auth.check("d2.reads", "d2.reads", &s_d2),
            Ok(Role::Daemon),
            "a daemon identity from the registry"
        );
        assert_eq!(
            auth.check("d2", "d2.reads", &s_d2),
            Err(Refusal::WrongClientId)
        );

        // Rotation through the file: the cached success no longer counts.
        let new_k1 = {
            let mut r = Registry::load(&path).unwrap();
            let s = r.rotate("k1", 1).unwrap();
            r.remove("c1").unwrap();
            r.save(&path).unwrap();
            s
        };
        assert_eq!(
            auth.check("kiosk-k1", "k1", &s_k1),
            Err(Refusal::WrongSecret)
        );
        assert_eq!(auth.check("kiosk-k1", "k1", &new_k1), Ok(Role::Kiosk));
        assert_eq!(
            auth.check("courier-c1", "c1", &s_c1),
            Err(Refusal::UnknownDevice)
        );
        assert_eq!(auth.counts().reloads, 1);

        // A broken file keeps the last good registry.
        std::fs::write(&path, "not json").unwrap();
        assert_eq!(auth.check("kiosk-k1", "k1", &new_k1), Ok(Role::Kiosk));
    }
}
