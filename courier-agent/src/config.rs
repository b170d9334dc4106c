//! What one courier agent needs to know: who it is, where the broker is, how it answers
//! offers when nobody is at the keyboard. Built from the command line ([`crate::cli`]) or
//! directly by the fleet and by tests.

use std::path::PathBuf;
use std::time::Duration;

use pickup_protocol::client::{BrokerUrl, Version};
use pickup_protocol::{validate, Topics, Vehicle};
use thiserror::Error;

use crate::geo::Point;
use crate::queue::QueueStore;

/// A setting that cannot be used; the message names the setting and what to fix.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl ConfigError {
    pub(crate) fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

/// How an agent answers jobs without a human: automation, demos and load.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Answer offers automatically (accept, or decline with `decline_rate`).
    pub auto_answer: bool,
    /// Share of offers declined when answering automatically, 0.0..=1.0.
    pub decline_rate: f64,
    /// Think time before an automatic answer, milliseconds (lowest, highest).
    pub think_ms: (u64, u64),
    /// Finish jobs automatically: `completed` this long after the job reaches `picked_up`,
    /// and `picked_up` this long after assignment once the pickup code is known (handed
    /// over with [`Agent::provide_code`](crate::Agent::provide_code), or carried by the job
    /// message of a demo daemon).
    pub complete_after: Option<Duration>,
    /// Seed for the automatic decisions; `None` seeds from the OS.
    pub seed: Option<u64>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            auto_answer: false,
            decline_rate: 0.0,
            think_ms: (0, 0),
            complete_after: None,
            seed: None,
        }
    }
}

impl Policy {
    /// Checks ranges; `field` prefixes the messages (a flag name or a config key).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.decline_rate.is_finite() || !(0.0..=1.0).contains(&self.decline_rate) {
            return Err(ConfigError::new(format!(
                "--decline-rate: must be a number from 0.0 to 1.0, got {}",
                self.decline_rate
            )));
        }
        if self.think_ms.0 > self.think_ms.1 {
            return Err(ConfigError::new(
                "think time: the lowest must not exceed the highest",
            ));
        }
        Ok(())
    }
}

/// Everything one agent runs with.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where the broker is.
    pub broker: BrokerUrl,
    /// Site name: topics live under `pickup/v1/<site>/`.
    pub site: String,
    /// Courier id (a topic segment, so restricted to `A-Z a-z 0-9 _ . -`).
    pub courier_id: String,
    /// MQTT client id; fixed so the broker keeps the session across reconnects.
    pub client_id: String,
    /// Display name shown to customers.
    pub name: Option<String>,
    /// Vehicle: decides which parcels the daemon offers.
    pub vehicle: Vehicle,
    /// The courier's phone number (customers see it masked).
    pub tel: Option<String>,
    /// Where the courier is at start.
    pub position: Point,
    /// On shift at start.
    pub available: bool,
    /// Username and password, when the broker requires them.
    pub credentials: Option<(String, String)>,
    /// MQTT protocol version.
    pub version: Version,
    /// Where replies wait until the broker acknowledges them.
    pub queue: QueueStore,
    /// Automatic answers.
    pub policy: Policy,
    /// Location is reported at least this often while connected.
    pub location_interval: Duration,
    /// A move of at least this many metres is reported at once.
    pub move_threshold_m: f64,
    /// MQTT 5 will delay, seconds: a short blip does not mark the courier offline.
    pub will_delay_s: u32,
    /// Keep-alive, seconds: how soon the broker notices a dead handheld.
    pub keep_alive_s: u16,
    /// Reconnect backoff, shortest wait.
    pub reconnect_min: Duration,
    /// Reconnect backoff, longest wait.
    pub reconnect_max: Duration,
    /// Capacity of the MQTT client's request channel.
    pub channel_capacity: usize,
    /// How long a sent reply waits for the daemon's answer before it is sent again (the
    /// wait doubles with each attempt, up to a minute). A reply leaves the queue only when
    /// answered: the broker acknowledging it proves nothing when no daemon was subscribed.
    pub answer_timeout: Duration,
}

impl AgentConfig {
    /// A courier with defaults for everything but identity and place.
    pub fn new(
        broker: BrokerUrl,
        site: &str,
        courier_id: &str,
        vehicle: Vehicle,
        position: Point,
    ) -> Self {
        Self {
            broker,
            site: site.to_string(),
            courier_id: courier_id.to_string(),
            client_id: format!("courier-{courier_id}"),
            name: None,
            vehicle,
            tel: None,
            position,
            available: true,
            credentials: None,
            version: Version::V4,
            queue: QueueStore::File(default_queue_path(courier_id)),
            policy: Policy::default(),
            location_interval: Duration::from_secs(30),
            move_threshold_m: 50.0,
            will_delay_s: 5,
            keep_alive_s: 30,
            reconnect_min: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(10),
            channel_capacity: 1024,
            answer_timeout: Duration::from_secs(5),
        }
    }

    /// The topic builder for this agent's site.
    pub fn topics(&self) -> Result<Topics, ConfigError> {
        Topics::new(&self.site).map_err(|e| ConfigError::new(format!("--site: {e}")))
    }

    /// Checks every value; the error names the flag.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.topics()?;
        validate::id("--id", &self.courier_id).map_err(ConfigError)?;
        if self.client_id.is_empty() || self.client_id.len() > 128 {
            return Err(ConfigError::new(
                "--client-id: must be 1-128 characters long",
            ));
        }
        if let Some(n) = &self.name {
            validate::text("--name", n).map_err(ConfigError)?;
        }
        if let Some(t) = &self.tel {
            validate::phone("--tel", t).map_err(ConfigError)?;
        }
        validate::lat_lon("--lat/--lon", self.position.lat, self.position.lon)
            .map_err(|e| ConfigError::new(e.replace("--lat/--lon.", "--")))?;
        if !self.move_threshold_m.is_finite() || self.move_threshold_m < 0.0 {
            return Err(ConfigError::new(
                "--move-threshold-m: must be a number of metres, 0 or more",
            ));
        }
        if self.location_interval.is_zero() {
            return Err(ConfigError::new(
                "--location-interval-s: must be at least 1 second",
            ));
        }
        if self.keep_alive_s == 0 {
            return Err(ConfigError::new("keep-alive: must be at least 1 second"));
        }
        if self.answer_timeout < Duration::from_millis(100) {
            return Err(ConfigError::new(
                "--answer-timeout-ms: must be at least 100 ms",
            ));
        }
        if let Some((u, _)) = &self.credentials {
            if u.is_empty() {
                return Err(ConfigError::new("--user: must not be empty"));
            }
        }
        self.policy.validate()
    }
}

/// The default queue file: `$XDG_STATE_HOME/courier-agent/courier-<cid>.queue` when the
/// user has a state directory, else `./data/courier-<cid>.queue` (a checkout).
pub fn default_queue_path(courier_id: &str) -> PathBuf {
    let file = format!("courier-{courier_id}.queue");
    match std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("courier-agent").join(file),
        None => PathBuf::from("data").join(file),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AgentConfig {
        AgentConfig::new(
            BrokerUrl::parse("mqtt://127.0.0.1:1883").unwrap(),
            "default",
            "k1",
            Vehicle::Scooter,
            Point::new(37.5, 127.0),
        )
    }

    #[test]
    fn defaults_are_valid() {
        let c = cfg();
        c.validate().unwrap();
        assert_eq!(c.client_id, "courier-k1");
    }

    #[test]
    fn errors_name_the_flag() {
        let mut c = cfg();
        c.position.lat = 91.0;
        assert!(c.validate().unwrap_err().0.starts_with("--lat"));
        let mut c = cfg();
        c.courier_id = "a/b".into();
        assert!(c.validate().unwrap_err().0.starts_with("--id"));
        let mut c = cfg();
        c.tel = Some("12".into());
        assert!(c.validate().unwrap_err().0.starts_with("--tel"));
        let mut c = cfg();
        c.policy.decline_rate = 1.5;
        assert!(c.validate().unwrap_err().0.starts_with("--decline-rate"));
        let mut c = cfg();
        c.site = "a+b".into();
        assert!(c.validate().unwrap_err().0.starts_with("--site"));
    }
}
