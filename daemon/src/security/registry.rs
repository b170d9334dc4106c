//! The device registry: who may connect, in which role, proven by which secret.
//!
//! One JSON file (`[security] registry`, by default `registry.json` next to the database),
//! separate from the database so that an operator can manage devices on the box with
//! `pickupctl device …` while the daemon runs, and so that the daemon picks changes up by
//! watching the file instead of taking writes from outside.
//!
//! Secrets are generated here (32 random bytes, base64url), shown once, and stored only
//! hashed: argon2id for the embedded broker, plus Mosquitto's PBKDF2-SHA512 (`$7$`) form,
//! computed at the same moment, because the plaintext is gone afterwards and the
//! generated Mosquitto password file needs it.
//!
//! Writes are atomic (temporary file in the same directory, fsync, rename), keep the
//! previous file's owner, and are 0600. Read-modify-write sequences hold an exclusive
//! `flock` on `<registry>.lock`, so two `pickupctl` runs cannot lose each other's change.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Algorithm, Argon2, Params, Version};
use base64ct::{Base64, Base64UrlUnpadded, Encoding};
use pickup_protocol::validate::is_valid_id;
use pickup_protocol::Millis;
use rand::Rng;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Longest device id: the operator client id `ctl-<id>--<8 hex>` must still be a valid
/// 64-character id, because it names the reply topic `clients/<client id>/replies`.
pub const MAX_DEVICE_ID: usize = 48;

/// argon2id cost: 7 MiB, 5 passes, 1 lane, the least memory among OWASP's equally strong
/// minimum settings for argon2id (19 MiB with 2 passes is another). The secrets are 256
/// random bits, so the hash guards against a leaked file, not against guessing; a higher
/// cost would only slow down every device's connect. Memory is what an edge box lacks:
/// each check of a secret not yet cached holds this much while it runs. Hashes made with
/// other parameters (19 MiB, 2 passes before) verify with their own.
const ARGON2_M_KIB: u32 = 7 * 1024;
const ARGON2_T: u32 = 5;
const ARGON2_P: u32 = 1;

/// PBKDF2-SHA512 iterations for the Mosquitto form. `mosquitto_passwd` writes 101; more
/// costs Mosquitto CPU on every CONNECT (it does not cache), and the secrets are random.
pub const MOSQUITTO_ITERATIONS: u32 = 10_000;

/// What a device is, and so what it may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A courier handheld (`courier-agent`): its own `couriers/<id>/…` topics.
    Courier,
    /// A kiosk: call requests and its own reply topic.
    Kiosk,
    /// The notification relay: reads `notifications`.
    Relay,
    /// An operator tool (`pickupctl`): reads, and status requests.
    Operator,
    /// The daemon itself: everything under the site's prefix.
    Daemon,
}

impl Role {
    /// Every role, for listings and help.
    pub const ALL: [Role; 5] = [
        Role::Courier,
        Role::Kiosk,
        Role::Relay,
        Role::Operator,
        Role::Daemon,
    ];

    /// The wire/CLI name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Courier => "courier",
            Role::Kiosk => "kiosk",
            Role::Relay => "relay",
            Role::Operator => "operator",
            Role::Daemon => "daemon",
        }
    }

    /// Parses a CLI name.
    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// The client id prefix of the role (`None` for the daemon, whose client id is its id).
    pub fn client_prefix(self) -> Option<&'static str> {
        match self {
            Role::Courier => Some("courier-"),
            Role::Kiosk => Some("kiosk-"),
            Role::Relay => Some("relay-"),
            Role::Operator => Some("ctl-"),
            Role::Daemon => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The client id a device of `role` with id `id` connects with (operators may add a
/// `--<suffix>`, see [`client_id_allowed`]).
pub fn client_id_for(role: Role, id: &str) -> String {
    match role.client_prefix() {
        Some(p) => format!("{p}{id}"),
        None => id.to_string(),
    }
}

/// The binding of client ids to identities: a device connects only as itself.
///
/// - courier `c` → `courier-c`, kiosk `k` → `kiosk-k`, relay `r` → `relay-r`,
///   daemon `d` → `d`;
/// - operator `o` → `ctl-o`, or `ctl-o--<1-16 letters/digits>` so one operator can run
///   several `pickupctl` commands at once. Ids may not contain `--`, so the suffix is never
///   confused with another identity's id.
pub fn client_id_allowed(role: Role, id: &str, client_id: &str) -> bool {
    let Some(prefix) = role.client_prefix() else {
        return client_id == id;
    };
    let Some(rest) = client_id
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix(id))
    else {
        return false;
    };
    if rest.is_empty() {
        return true;
    }
    role == Role::Operator
        && rest.strip_prefix("--").is_some_and(|s| {
            !s.is_empty() && s.len() <= 16 && s.bytes().all(|b| b.is_ascii_alphanumeric())
        })
}

/// Suffix of the daemon's second identity, used by its status-read connection: the same
/// secret as the daemon, its own client id (a broker allows one connection per client id,
/// and Mosquitto binds client ids to usernames), and only the rights that reads need.
pub const READS_SUFFIX: &str = ".reads";

/// The read connection's identity for daemon identity `id`.
pub fn reads_identity(id: &str) -> String {
    format!("{id}{READS_SUFFIX}")
}

/// Checks a new device id; the message says what is wrong.
pub fn check_id(id: &str, role: Role) -> Result<(), String> {
    if !is_valid_id(id) || id.len() > MAX_DEVICE_ID {
        return Err(format!(
            "device id {id:?} must be 1-{MAX_DEVICE_ID} characters of A-Z a-z 0-9 _ . -"
        ));
    }
    if id.contains("--") {
        return Err(format!(
            "device id {id:?} must not contain \"--\" (it separates an operator's client id suffix)"
        ));
    }
    if id.ends_with(READS_SUFFIX) {
        return Err(format!(
            "device id {id:?} must not end with {READS_SUFFIX:?} (reserved for the daemon's status-read connection)"
        ));
    }
    if role == Role::Daemon {
        if let Some(p) = Role::ALL
            .iter()
            .filter_map(|r| r.client_prefix())
            .find(|p| id.starts_with(p))
        {
            return Err(format!(
                "daemon id {id:?} must not start with {p:?}: its client id would look like another device's"
            ));
        }
    }
    Ok(())
}

/// One device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// The device id: its MQTT username and the id in its topics.
    pub id: String,
    /// What it may do.
    pub role: Role,
    /// argon2id PHC string of the secret (checked by the embedded broker).
    pub secret_hash: String,
    /// Mosquitto's `$7$` PBKDF2-SHA512 form of the same secret (for the generated
    /// password file); made when the secret is made, since the secret is not kept.
    pub mosquitto_hash: String,
    /// When it was added (unix ms).
    pub created_at: Millis,
    /// When its secret was last replaced (unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated_at: Option<Millis>,
}

/// Why the registry could not be read, written or changed.
#[derive(Debug, Error)]
pub enum RegistryError {
    /// File system trouble.
    #[error("device registry {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The file is not a registry (it is not rewritten; fix or remove it).
    #[error("device registry {path} is unreadable: {problem}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A change was refused.
    #[error("{0}")]
    Refused(String),
    /// Hashing failed (never expected; reported rather than panicking).
    #[error("cannot hash the secret: {0}")]
    Hash(String),
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> RegistryError + '_ {
    move |source| RegistryError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// On-disk shape.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    /// Format version, 1.
    version: u32,
    /// Every device, sorted by id.
    devices: Vec<Identity>,
}

/// The registry in memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registry {
    devices: BTreeMap<String, Identity>,
}

impl Registry {
    /// Reads `path`; a missing file is an empty registry.
    pub fn load(path: &Path) -> Result<Registry, RegistryError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Registry::default()),
            Err(e) => return Err(io(path)(e)),
        };
        Registry::parse(&text).map_err(|problem| RegistryError::Corrupt {
            path: path.to_path_buf(),
            problem,
        })
    }

    /// Parses the file's text.
    pub fn parse(text: &str) -> Result<Registry, String> {
        let f: FileFormat = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if f.version != 1 {
            return Err(format!(
                "version {} is not supported (expected 1)",
                f.version
            ));
        }
        let mut devices = BTreeMap::new();
        for d in f.devices {
            check_id(&d.id, d.role).map_err(|e| format!("devices: {e}"))?;
            if devices.insert(d.id.clone(), d).is_some() {
                return Err("devices: an id appears twice".into());
            }
        }
        Ok(Registry { devices })
    }

    /// The file's text.
    pub fn to_json(&self) -> String {
        let f = FileFormat {
            version: 1,
            devices: self.devices.values().cloned().collect(),
        };
        let mut s = serde_json::to_string_pretty(&f).unwrap_or_default();
        s.push('\n');
        s
    }

    /// Writes atomically with mode 0600, keeping the owner of the file it replaces.
    pub fn save(&self, path: &Path) -> Result<(), RegistryError> {
        write_atomic(path, self.to_json().as_bytes())
    }

    /// A device by id.
    pub fn get(&self, id: &str) -> Option<&Identity> {
        self.devices.get(id)
    }

    /// Every device, by id.
    pub fn iter(&self) -> impl Iterator<Item = &Identity> {
        self.devices.values()
    }

    /// Number of devices.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// Whether there are no devices at all.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Whether any identity other than a daemon's exists (the daemon adds its own at its
    /// first start; that alone does not end the zero-setup mode).
    pub fn has_devices(&self) -> bool {
        self.devices.values().any(|d| d.role != Role::Daemon)
    }

    /// Adds a device with a fresh secret and returns the secret (shown once).
    pub fn add(&mut self, id: &str, role: Role, now: Millis) -> Result<String, RegistryError> {
        check_id(id, role).map_err(RegistryError::Refused)?;
        if let Some(d) = self.devices.get(id) {
            return Err(RegistryError::Refused(format!(
                "device {id:?} already exists (role {}); use rotate for a new secret",
                d.role
            )));
        }
        let secret = new_secret();
        let identity = Identity {
            id: id.to_string(),
            role,
            secret_hash: hash_secret(&secret)?,
            mosquitto_hash: mosquitto_hash(&secret),
            created_at: now,
            rotated_at: None,
        };
        self.devices.insert(id.to_string(), identity);
        Ok(secret)
    }

    /// Removes a device.
    pub fn remove(&mut self, id: &str) -> Result<Identity, RegistryError> {
        self.devices
            .remove(id)
            .ok_or_else(|| RegistryError::Refused(format!("no device {id:?}")))
    }

    /// Gives a device a new secret and returns it; the old one stops working.
    pub fn rotate(&mut self, id: &str, now: Millis) -> Result<String, RegistryError> {
        let secret = new_secret();
        let hash = hash_secret(&secret)?;
        let d = self
            .devices
            .get_mut(id)
            .ok_or_else(|| RegistryError::Refused(format!("no device {id:?}")))?;
        d.secret_hash = hash;
        d.mosquitto_hash = mosquitto_hash(&secret);
        d.rotated_at = Some(now);
        Ok(secret)
    }
}

/// An exclusive lock on `<registry>.lock` for a read-modify-write; released on drop.
pub struct RegistryLock {
    _file: File,
}

impl RegistryLock {
    /// Waits for the lock (other `pickupctl` runs hold it for milliseconds).
    pub fn acquire(registry: &Path) -> Result<RegistryLock, RegistryError> {
        let path = lock_path(registry);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io(&path))?;
        // SAFETY: flock(2) on a descriptor this function owns; no memory is shared.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(io(&path)(std::io::Error::last_os_error()));
        }
        Ok(RegistryLock { _file: file })
    }
}

fn lock_path(registry: &Path) -> PathBuf {
    let mut name = registry.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    registry.with_file_name(name)
}

/// Writes `data` to `path` atomically: a 0600 temporary file in the same directory,
/// fsync, the previous file's owner (when run as root), rename, fsync of the directory.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), RegistryError> {
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d.to_path_buf(),
        None => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let previous = std::fs::metadata(path).ok();
    let mut tmp = tempfile::Builder::new()
        .prefix(".registry-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .tempfile_in(&dir)
        .map_err(io(&dir))?;
    tmp.write_all(data).map_err(io(tmp.path()))?;
    tmp.as_file().sync_all().map_err(io(tmp.path()))?;
    if let Some(m) = previous {
        // Keep the daemon's ownership when root edits the file; harmless when it fails
        // for an unprivileged user (then the owner is already that user).
        let _ = std::os::unix::fs::fchown(tmp.as_file(), Some(m.uid()), Some(m.gid()));
    }
    tmp.persist(path).map_err(|e| io(path)(e.error))?;
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// A fresh secret: 32 random bytes, base64url without padding (43 characters).
pub fn new_secret() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    Base64UrlUnpadded::encode_string(&bytes)
}

fn argon2() -> Result<Argon2<'static>, RegistryError> {
    let params = Params::new(ARGON2_M_KIB, ARGON2_T, ARGON2_P, None)
        .map_err(|e| RegistryError::Hash(e.to_string()))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// The argon2id PHC string of `secret` with a random salt.
pub fn hash_secret(secret: &str) -> Result<String, RegistryError> {
    let salt: [u8; 16] = rand::rng().random();
    argon2()?
        .hash_password_with_salt(secret.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| RegistryError::Hash(e.to_string()))
}

/// Whether `secret` matches an argon2 PHC string (its own parameters are used).
pub fn verify_secret(secret: &str, phc: &str) -> bool {
    Argon2::default()
        .verify_password(secret.as_bytes(), phc)
        .is_ok()
}

/// Mosquitto's password file form of `secret`: `$7$<iterations>$<salt>$<hash>`, PBKDF2
/// with HMAC-SHA512, standard base64 (what `mosquitto_passwd` writes since 2.0).
pub fn mosquitto_hash(secret: &str) -> String {
    let salt: [u8; 12] = rand::rng().random();
    mosquitto_hash_with(secret, &salt, MOSQUITTO_ITERATIONS)
}

fn mosquitto_hash_with(secret: &str, salt: &[u8], iterations: u32) -> String {
    let mut out = [0u8; 64];
    let n = std::num::NonZeroU32::new(iterations.max(1)).unwrap_or(std::num::NonZeroU32::MIN);
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA512,
        n,
        salt,
        secret.as_bytes(),
        &mut out,
    );
    format!(
        "$7${iterations}${}${}",
        Base64::encode_string(salt),
        Base64::encode_string(&out)
    )
}

/// Whether `secret` matches a `$7$` Mosquitto hash (for tests and checks).
pub fn verify_mosquitto(secret: &str, hash: &str) -> bool {
    let mut parts = hash.split('$');
    let (Some(""), Some("7"), Some(iter), Some(salt), Some(expected), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return false;
    };
    let (Ok(iter), Ok(salt), Ok(expected)) = (
        iter.parse::<u32>(),
        Base64::decode_vec(salt),
        Base64::decode_vec(expected),
    ) else {
        return false;
    };
    let Some(n) = std::num::NonZeroU32::new(iter) else {
        return false;
    };
    ring::pbkdf2::verify(
        ring::pbkdf2::PBKDF2_HMAC_SHA512,
        n,
        &salt,
        secret.as_bytes(),
        &expected,
    )
    .is_ok()
}

/// A file's identity for change detection: inode (a rename makes a new one), size and
/// modification time.
pub fn file_stamp(path: &Path) -> Option<(u64, u64, i64, i64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_hash_made_with_other_parameters_still_verifies() {
        // Registries written before the cost changed hold 19 MiB / 2 pass hashes.
        let salt = [9u8; 16];
        let old = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(19 * 1024, 2, 1, None).unwrap(),
        )
        .hash_password_with_salt(b"an old secret", &salt)
        .unwrap()
        .to_string();
        assert!(old.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        assert!(verify_secret("an old secret", &old));
        assert!(!verify_secret("another secret", &old));
    }

    /// Each check allocates the hash's working memory and frees it. With glibc's
    /// adjustable mmap threshold, checks in a row kept up to seven such blocks resident
    /// (52 MB at 7 MiB each, 138 MB at 19 MiB); `memory::configure` fixes the threshold
    /// so each block is unmapped when freed.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn checks_in_a_row_keep_no_working_memory() {
        crate::memory::configure();
        let phc = hash_secret("a secret").unwrap();
        assert!(verify_secret("a secret", &phc));
        let before = crate::memory::resident_bytes().unwrap();
        for _ in 0..12 {
            assert!(verify_secret("a secret", &phc));
        }
        let after = crate::memory::resident_bytes().unwrap();
        let grown = after.saturating_sub(before);
        assert!(
            grown < u64::from(ARGON2_M_KIB) * 1024 * 2,
            "resident size grew by {grown} bytes over 12 checks"
        );
    }

    #[test]
    fn add_verify_rotate_remove_round_trip_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/registry.json");
        let mut r = Registry::load(&path).unwrap();
        assert!(r.is_empty());
        let s1 = r.add("k1", Role::Kiosk, 1).unwrap();
        let s2 = r.add("c1", Role::Courier, 2).unwrap();
        assert_ne!(s1, s2);
        assert_eq!(s1.len(), 43);
        r.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&s1), "plaintext secret stored");

        let mut back = Registry::load(&path).unwrap();
        assert_eq!(back, r);
        let k1 = back.get("k1").unwrap().clone();
        assert!(k1.secret_hash.starts_with("$argon2id$v=19$m=7168,t=5,p=1$"));
        assert!(verify_secret(&s1, &k1.secret_hash));
        assert!(!verify_secret(&s2, &k1.secret_hash));
        assert!(verify_mosquitto(&s1, &k1.mosquitto_hash));
        assert!(!verify_mosquitto(&s2, &k1.mosquitto_hash));

        let s3 = back.rotate("k1", 5).unwrap();
        let k1b = back.get("k1").unwrap();
        assert!(!verify_secret(&s1, &k1b.secret_hash));
        assert!(verify_secret(&s3, &k1b.secret_hash));
        assert_eq!(k1b.rotated_at, Some(5));
        assert_eq!(k1b.created_at, 1);

        assert!(back.add("k1", Role::Courier, 6).is_err(), "duplicate id");
        back.remove("k1").unwrap();
        assert!(back.remove("k1").is_err());
        assert!(back.rotate("k1", 7).is_err());
        assert!(back.has_devices());
        back.remove("c1").unwrap();
        back.add("pickupd", Role::Daemon, 8).unwrap();
        assert!(
            !back.has_devices(),
            "the daemon's own identity is not a device"
        );
    }

    #[test]
    fn corrupt_files_are_reported_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.json");
        std::fs::write(&path, "{\"version\":1,\"devices\":[{\"id\":\"a b\"}]}").unwrap();
        let e = Registry::load(&path).unwrap_err().to_string();
        assert!(e.contains("registry.json"), "{e}");
        std::fs::write(&path, "{\"version\":2,\"devices\":[]}").unwrap();
        assert!(Registry::load(&path).is_err());
    }

    #[test]
    fn ids_and_client_ids() {
        assert!(check_id("k1", Role::Kiosk).is_ok());
        assert!(check_id("a--b", Role::Kiosk).is_err());
        assert!(check_id("a/b", Role::Kiosk).is_err());
        assert!(check_id(&"x".repeat(49), Role::Kiosk).is_err());
        assert!(check_id("courier-x", Role::Daemon).is_err());
        assert!(check_id("pickupd", Role::Daemon).is_ok());

        assert!(client_id_allowed(Role::Courier, "c1", "courier-c1"));
        assert!(!client_id_allowed(Role::Courier, "c1", "courier-c2"));
        assert!(!client_id_allowed(Role::Courier, "c1", "kiosk-c1"));
        assert!(!client_id_allowed(Role::Courier, "c1", "courier-c1--x"));
        assert!(!client_id_allowed(Role::Courier, "c", "courier-c1"));
        assert!(client_id_allowed(Role::Kiosk, "k1", "kiosk-k1"));
        assert!(client_id_allowed(Role::Relay, "r", "relay-r"));
        assert!(client_id_allowed(Role::Daemon, "pickupd", "pickupd"));
        assert!(!client_id_allowed(Role::Daemon, "pickupd", "pickupd2"));
        assert!(client_id_allowed(Role::Operator, "op", "ctl-op"));
        assert!(client_id_allowed(Role::Operator, "op", "ctl-op--1a2b3c4d"));
        assert!(!client_id_allowed(Role::Operator, "op", "ctl-op--"));
        assert!(!client_id_allowed(Role::Operator, "op", "ctl-op-x"));
        assert!(!client_id_allowed(Role::Operator, "op", "ctl-op--a.b"));
        assert_eq!(client_id_for(Role::Courier, "c1"), "courier-c1");
        assert_eq!(client_id_for(Role::Daemon, "pickupd"), "pickupd");
    }

    #[test]
    fn mosquitto_hash_matches_a_known_vector() {
        // PBKDF2-HMAC-SHA512("password", "salt", 1), first 64 bytes (RFC 6070 style
        // vector for SHA-512, as published with the test vectors of many libraries).
        let h = mosquitto_hash_with("password", b"salt", 1);
        let expected = "867f70cf1ade02cff3752599a3a53dc4af34c7a669815ae5d513554e1c8cf252c02d470a285a0501bad999bfe943c08f050235d7d68b1da55e63f73b60a57fce";
        let got = Base64::decode_vec(h.rsplit('$').next().unwrap()).unwrap();
        let hex: String = got.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, expected);
        assert!(h.starts_with("$7$1$c2FsdA==$"));
    }

    #[test]
    fn concurrent_edits_under_the_lock_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.json");
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let _l = RegistryLock::acquire(&path).unwrap();
                    let mut r = Registry::load(&path).unwrap();
                    r.add(&format!("k{i}"), Role::Kiosk, i).unwrap();
                    r.save(&path).unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(Registry::load(&path).unwrap().len(), 4);
    }
}
