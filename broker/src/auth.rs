//! Who may connect: static users, the auth hook, and the broker's own probe.
//!
//! rumqttd uses either its static user table or one external callback, never both, so the
//! broker always installs one callback that applies the whole policy: the health probe's
//! secret first (so probes never depend on a device registry), then the static users, then
//! the hook.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::config::{AuthHook, PROBE_USER};
use crate::probe::PROBE_CLIENT_PREFIX;

/// The connect policy of one broker.
#[derive(Clone)]
pub(crate) struct Policy {
    pub users: Arc<BTreeMap<String, String>>,
    pub hook: Option<AuthHook>,
    pub probe_secret: Arc<str>,
}

/// What the policy decides without running the hook.
pub(crate) enum Verdict {
    Allow,
    Deny,
    AskHook(AuthHook),
}

impl Policy {
    pub fn decide(&self, client_id: &str, user: &str, pass: &str) -> Verdict {
        if user == PROBE_USER {
            let ok = client_id.starts_with(PROBE_CLIENT_PREFIX)
                && ct_eq(pass.as_bytes(), self.probe_secret.as_bytes());
            return if ok { Verdict::Allow } else { Verdict::Deny };
        }
        if !self.users.is_empty() {
            match self.users.get(user) {
                Some(expected) if ct_eq(pass.as_bytes(), expected.as_bytes()) => {}
                _ => return Verdict::Deny,
            }
        }
        match &self.hook {
            Some(h) => Verdict::AskHook(h.clone()),
            None => Verdict::Allow,
        }
    }

    /// The decision, running the hook on a blocking thread so a slow lookup does not
    /// stall the listener's other connections.
    pub async fn check(self, client_id: String, user: String, pass: String) -> bool {
        match self.decide(&client_id, &user, &pass) {
            Verdict::Allow => true,
            Verdict::Deny => false,
            Verdict::AskHook(hook) => {
                let verdict =
                    tokio::task::spawn_blocking(move || hook(&client_id, &user, &pass)).await;
                match verdict {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::error!(error = %e, "auth hook failed; connection refused");
                        false
                    }
                }
            }
        }
    }
}

/// Compares secrets without an early exit on the first differing byte.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(users: &[(&str, &str)], hook: Option<AuthHook>) -> Policy {
        Policy {
            users: Arc::new(
                users
                    .iter()
                    .map(|(u, p)| (u.to_string(), p.to_string()))
                    .collect(),
            ),
            hook,
            probe_secret: Arc::from("probe-secret"),
        }
    }

    fn allowed(p: &Policy, c: &str, u: &str, pw: &str) -> bool {
        match p.decide(c, u, pw) {
            Verdict::Allow => true,
            Verdict::Deny => false,
            Verdict::AskHook(h) => h(c, u, pw),
        }
    }

    #[test]
    fn static_users_and_hook_must_both_pass() {
        let hook: AuthHook = Arc::new(|c, u, _| c == format!("kiosk-{u}"));
        let p = policy(&[("1", "pw")], Some(hook));
        assert!(allowed(&p, "kiosk-1", "1", "pw"));
        assert!(!allowed(&p, "kiosk-2", "1", "pw"), "hook refuses");
        assert!(!allowed(&p, "kiosk-1", "1", "pW"), "wrong password");
        assert!(!allowed(&p, "kiosk-1", "2", "pw"), "unknown user");
    }

    #[test]
    fn probe_needs_its_secret_and_prefix() {
        let deny_all: AuthHook = Arc::new(|_, _, _| false);
        let p = policy(&[], Some(deny_all));
        assert!(allowed(
            &p,
            "pickup-probe-v4-x-1",
            PROBE_USER,
            "probe-secret"
        ));
        assert!(!allowed(&p, "pickup-probe-v4-x-1", PROBE_USER, "guess"));
        assert!(!allowed(&p, "kiosk-1", PROBE_USER, "probe-secret"));
    }

    #[test]
    fn constant_time_compare() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }
}
