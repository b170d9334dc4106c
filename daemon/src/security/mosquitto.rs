//! Mosquitto configuration generated from the device registry: the production broker,
//! because the embedded rumqttd cannot authorize per topic.
//!
//! Three files:
//! - `passwd`: `id:$7$…` lines (PBKDF2-SHA512, made when each secret was made);
//! - `acl`: one `user` block per device with exactly its topics;
//! - `pickupd.conf`: the settings that tie them together, for `/etc/mosquitto/conf.d/`.
//!
//! Why `user` blocks and not only `pattern` lines: Mosquitto applies `pattern` rules to
//! every user, whatever its role, so a role-wide pattern such as
//! `pattern write pickup/v1/s/couriers/%u/presence` would also let a *kiosk* named `k1`
//! announce itself as courier `k1`. Per-device blocks give each identity its role's
//! topics and nothing else. `%u`/`%c` stay useful for rules that hold for every role;
//! this ACL needs none.
//!
//! Client ids are bound to usernames with `use_username_as_clientid true`: Mosquitto has
//! no per-user client id rule, and without it any device could take over another's
//! session (and so disconnect it) by connecting with its client id.
//!
//! Rules, with `P` = `pickup/v1/<site>`:
//! - courier `c`: write `P/couriers/c/{presence,location,job/reply}`, read
//!   `P/couriers/c/{job,replies}`;
//! - kiosk `k`: write `P/calls/create`, `P/calls/+/cancel`, `P/calls/+/get`, read
//!   `P/kiosks/k/replies`;
//! - relay: read `P/notifications` (the only topic with full phone numbers);
//! - operator: read state (`P/calls/+/state`, `P/couriers/+/{presence,location,job}`,
//!   `P/scales/+/weight`, `P/daemon/state`) and `P/clients/+/replies`; write only
//!   `P/calls/+/get` (status requests change nothing);
//! - daemon: read and write `P/#`; its status-read connection (`<daemon>.reads`, same
//!   secret): read `P/calls/+/get`, write `P/{kiosks,clients}/+/replies`.
//!
//! Anything not granted is denied. Mosquitto drops a denied publish silently (a QoS 1
//! publish is still acknowledged) and answers a denied subscription with SUBACK 0x80.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use pickup_protocol::Topics;

use super::registry::{write_atomic, Registry, RegistryError, Role};

/// The files written by [`write_config`].
#[derive(Debug, Clone)]
pub struct Written {
    /// Password file.
    pub passwd: PathBuf,
    /// ACL file.
    pub acl: PathBuf,
    /// Mosquitto settings referring to both.
    pub conf: PathBuf,
}

/// The ACL for `site`.
pub fn acl(registry: &Registry, topics: &Topics) -> String {
    let p = topics.prefix();
    let mut s = format!(
        "# Mosquitto ACL for pickupd site prefix {p}/, generated from the device registry\n\
         # by `pickupctl broker mosquitto-config`. Regenerate after every device change.\n\
         # Anything not granted here is denied.\n"
    );
    for d in registry.iter() {
        let id = &d.id;
        let _ = writeln!(s, "\n# {} {id}\nuser {id}", d.role);
        let rules: Vec<(&str, String)> = match d.role {
            Role::Courier => vec![
                ("write", format!("{p}/couriers/{id}/presence")),
                ("write", format!("{p}/couriers/{id}/location")),
                ("write", format!("{p}/couriers/{id}/job/reply")),
                ("read", format!("{p}/couriers/{id}/job")),
                ("read", format!("{p}/couriers/{id}/replies")),
            ],
            Role::Kiosk => vec![
                ("write", format!("{p}/calls/create")),
                ("write", format!("{p}/calls/+/cancel")),
                ("write", format!("{p}/calls/+/get")),
                ("read", format!("{p}/kiosks/{id}/replies")),
            ],
            Role::Relay => vec![("read", format!("{p}/notifications"))],
            Role::Operator => vec![
                ("read", format!("{p}/calls/+/state")),
                ("read", format!("{p}/couriers/+/presence")),
                ("read", format!("{p}/couriers/+/location")),
                ("read", format!("{p}/couriers/+/job")),
                ("read", format!("{p}/scales/+/weight")),
                ("read", format!("{p}/daemon/state")),
                ("read", format!("{p}/clients/+/replies")),
                ("write", format!("{p}/calls/+/get")),
            ],
            Role::Daemon => vec![("readwrite", format!("{p}/#"))],
        };
        for (access, topic) in rules {
            let _ = writeln!(s, "topic {access} {topic}");
        }
        if d.role == Role::Daemon {
            // Its status-read connection: status requests in, answers out.
            let r = super::registry::reads_identity(id);
            let _ = writeln!(
                s,
                "\n# daemon {id}: status-read connection\nuser {r}\n\
                 topic read {p}/calls/+/get\n\
                 topic write {p}/kiosks/+/replies\n\
                 topic write {p}/clients/+/replies"
            );
        }
    }
    s
}

/// The password file.
pub fn passwd(registry: &Registry) -> String {
    registry
        .iter()
        .map(|d| {
            let mut line = format!("{}:{}\n", d.id, d.mosquitto_hash);
            if d.role == Role::Daemon {
                // The status-read connection signs in with the daemon's secret.
                let r = super::registry::reads_identity(&d.id);
                line.push_str(&format!("{r}:{}\n", d.mosquitto_hash));
            }
            line
        })
        .collect()
}

/// One Mosquitto listener for the generated settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttListener {
    /// Address and port.
    pub addr: std::net::SocketAddr,
    /// TLS certificate chain and key (PEM), for an `mqtts://` listener.
    pub tls: Option<(PathBuf, PathBuf)>,
}

/// Mosquitto settings that use the generated files at `dir` (absolute paths), with the
/// given listeners. `use_username_as_clientid` is a per-listener option in Mosquitto
/// (outside a listener block it silently starts a default listener on port 1883), so
/// every listener block carries it.
pub fn conf(dir: &Path, listeners: &[MqttListener]) -> String {
    let mut s = format!(
        "# pickupd: Mosquitto settings generated by `pickupctl broker mosquitto-config`.\n\
         # Use as the broker's configuration, or include it from mosquitto.conf (and then\n\
         # define no other listeners there). After regenerating the password file and ACL:\n\
         # systemctl reload mosquitto (SIGHUP rereads both).\n\
         allow_anonymous false\n\
         password_file {dir}/passwd\n\
         acl_file {dir}/acl\n\
         # Small request/response packets must not wait for Nagle.\n\
         set_tcp_nodelay true\n\
         # The daemon's session must not drop queued requests while it restarts.\n\
         max_queued_messages 100000\n",
        dir = dir.display()
    );
    for l in listeners {
        let _ = write!(
            s,
            "\nlistener {} {}\n\
             # A device connects only as itself: its client id becomes its username.\n\
             use_username_as_clientid true\n",
            l.addr.port(),
            l.addr.ip()
        );
        if let Some((cert, key)) = &l.tls {
            let _ = write!(
                s,
                "certfile {}\nkeyfile {}\n",
                cert.display(),
                key.display()
            );
        }
    }
    s
}

/// Writes `passwd`, `acl` and `pickupd.conf` into `dir` (0600 each, atomically).
pub fn write_config(
    registry: &Registry,
    topics: &Topics,
    dir: &Path,
    listeners: &[MqttListener],
) -> Result<Written, RegistryError> {
    std::fs::create_dir_all(dir).map_err(|source| RegistryError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let abs = std::fs::canonicalize(dir).map_err(|source| RegistryError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let w = Written {
        passwd: abs.join("passwd"),
        acl: abs.join("acl"),
        conf: abs.join("pickupd.conf"),
    };
    write_atomic(&w.passwd, passwd(registry).as_bytes())?;
    write_atomic(&w.acl, acl(registry, topics).as_bytes())?;
    write_atomic(&w.conf, conf(&abs, listeners).as_bytes())?;
    Ok(w)
}

/// Hands the written files to the system user `owner` (Mosquitto drops root privileges
/// and then must read them). Returns whether it did: only root can, and only when the
/// user exists.
pub fn chown_to(w: &Written, owner: &str) -> Result<bool, RegistryError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(false);
    }
    let Ok(name) = std::ffi::CString::new(owner) else {
        return Ok(false);
    };
    // SAFETY: getpwnam with a NUL-terminated name; the result is read at once, before any
    // other getpw* call on this thread.
    let (uid, gid) = unsafe {
        let pw = libc::getpwnam(name.as_ptr());
        if pw.is_null() {
            return Ok(false);
        }
        ((*pw).pw_uid, (*pw).pw_gid)
    };
    for p in [&w.passwd, &w.acl, &w.conf] {
        std::os::unix::fs::chown(p, Some(uid), Some(gid)).map_err(|source| RegistryError::Io {
            path: p.clone(),
            source,
        })?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_role_gets_its_own_topics_only() {
        let mut r = Registry::default();
        r.add("c1", Role::Courier, 0).unwrap();
        r.add("k1", Role::Kiosk, 0).unwrap();
        r.add("r1", Role::Relay, 0).unwrap();
        r.add("op", Role::Operator, 0).unwrap();
        r.add("pickupd", Role::Daemon, 0).unwrap();
        let t = Topics::new("s").unwrap();
        let a = acl(&r, &t);
        assert!(a.contains("user c1\ntopic write pickup/v1/s/couriers/c1/presence\n"));
        assert!(a.contains("user k1\ntopic write pickup/v1/s/calls/create\n"));
        assert!(a.contains("user r1\ntopic read pickup/v1/s/notifications\n"));
        assert!(a.contains("user pickupd\ntopic readwrite pickup/v1/s/#\n"));
        let op = a.split("user op\n").nth(1).unwrap();
        let op = op.split("\n\n").next().unwrap();
        assert!(
            !op.contains("notifications"),
            "operators do not read phone numbers"
        );
        assert!(op.lines().filter(|l| l.starts_with("topic write")).count() == 1);
        assert!(a.contains(
            "user pickupd.reads\ntopic read pickup/v1/s/calls/+/get\n\
             topic write pickup/v1/s/kiosks/+/replies\n\
             topic write pickup/v1/s/clients/+/replies\n"
        ));
        let p = passwd(&r);
        assert_eq!(
            p.lines().count(),
            6,
            "five devices and the daemon's read identity"
        );
        let hash = |u: &str| {
            p.lines()
                .find_map(|l| l.strip_prefix(&format!("{u}:")).map(str::to_string))
                .unwrap()
        };
        assert_eq!(hash("pickupd.reads"), hash("pickupd"));
        assert!(p.lines().all(|l| l.contains(":$7$10000$")));
    }
}
