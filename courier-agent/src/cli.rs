//! The command line: one courier (interactive or by policy) or `--simulate N` couriers.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use pickup_protocol::client::{BrokerUrl, Version};
use pickup_protocol::Vehicle;

use crate::codes::CodeSource;
use crate::config::{AgentConfig, ConfigError, Policy};
use crate::console::ConsoleOptions;
use crate::fleet::FleetConfig;
use crate::geo::Point;
use crate::queue::QueueStore;

/// Command line of `courier-agent`.
#[derive(Debug, Parser)]
#[command(
    name = "courier-agent",
    version,
    about = "The courier handheld of pickupd: presence, location, jobs; or a simulated fleet",
    after_help = "Interactive commands (one per line on stdin): accept, decline [reason], \
picked <code>, done, shift on|off, move <lat> <lon>, status, help, quit"
)]
pub struct Cli {
    /// Broker URL (mqtt://host:port).
    #[arg(
        long,
        env = "COURIER_AGENT_BROKER",
        default_value = "mqtt://127.0.0.1:1883"
    )]
    pub broker: String,
    /// Site name (topics live under pickup/v1/SITE/).
    #[arg(long, default_value = "default")]
    pub site: String,
    /// Courier id; with --simulate, the prefix of the simulated ids (default "sim").
    #[arg(long)]
    pub id: Option<String>,
    /// MQTT client id (default courier-ID); fixed so the broker keeps the session.
    #[arg(long)]
    pub client_id: Option<String>,
    /// Display name.
    #[arg(long)]
    pub name: Option<String>,
    /// Vehicle: bicycle, scooter, car, van or truck.
    #[arg(long, default_value = "scooter")]
    pub vehicle: String,
    /// The courier's phone number.
    #[arg(long)]
    pub tel: Option<String>,
    /// Start latitude.
    #[arg(long, allow_negative_numbers = true)]
    pub lat: Option<f64>,
    /// Start longitude.
    #[arg(long, allow_negative_numbers = true)]
    pub lon: Option<f64>,
    /// Broker username.
    #[arg(long, env = "COURIER_AGENT_USER")]
    pub user: Option<String>,
    /// Broker password (prefer the environment variable: arguments are visible to `ps`).
    #[arg(long, env = "COURIER_AGENT_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// MQTT protocol version: 4 (3.1.1) or 5.
    #[arg(long, default_value_t = 4)]
    pub mqtt_version: u8,
    /// Queue file for replies taken while offline (default
    /// $XDG_STATE_HOME/courier-agent/courier-ID.queue, else ./data/courier-ID.queue).
    #[arg(long)]
    pub queue_file: Option<PathBuf>,
    /// Accept offers automatically.
    #[arg(long)]
    pub auto_accept: bool,
    /// Share of offers declined automatically (0.0-1.0); implies automatic answers.
    #[arg(long)]
    pub decline_rate: Option<f64>,
    /// Send `completed` this many ms after the job reaches picked_up (and `picked_up`
    /// after assignment when the job carries a pickup code).
    #[arg(long)]
    pub auto_complete_after_ms: Option<u64>,
    /// Start off shift.
    #[arg(long)]
    pub off_shift: bool,
    /// Report the location at least this often, seconds.
    #[arg(long, default_value_t = 30)]
    pub location_interval_s: u64,
    /// Report at once after moving this many metres.
    #[arg(long, default_value_t = 50.0)]
    pub move_threshold_m: f64,
    /// MQTT 5 will delay, seconds (0: none).
    #[arg(long, default_value_t = 5)]
    pub will_delay_s: u32,
    /// MQTT keep-alive, seconds.
    #[arg(long, default_value_t = 30)]
    pub keep_alive_s: u16,
    /// Longest wait between reconnect attempts, ms.
    #[arg(long, default_value_t = 10_000)]
    pub reconnect_max_ms: u64,
    /// Do not read commands from stdin; run until SIGINT/SIGTERM.
    #[arg(long)]
    pub no_input: bool,
    /// Print events as JSON lines instead of text.
    #[arg(long)]
    pub json: bool,
    /// Run a fleet of N simulated couriers instead of one.
    #[arg(long)]
    pub simulate: Option<usize>,
    /// Fleet center "LAT,LON" (default --lat,--lon, else 37.5665,126.978).
    #[arg(long, allow_hyphen_values = true)]
    pub center: Option<String>,
    /// Fleet radius around the center, metres.
    #[arg(long, default_value_t = 2000.0)]
    pub radius_m: f64,
    /// Seed for a reproducible fleet (positions, vehicles, moves, shifts, answers).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Fleet: one queue file per courier in this directory (default: memory only).
    #[arg(long)]
    pub queue_dir: Option<PathBuf>,
    /// Fleet: simulation step, ms.
    #[arg(long, default_value_t = 1000)]
    pub tick_ms: u64,
    /// Fleet: mean time on shift before a break, seconds (0: never leave).
    #[arg(long, default_value_t = 900)]
    pub shift_on_mean_s: u64,
    /// Fleet: mean break, seconds.
    #[arg(long, default_value_t = 120)]
    pub shift_off_mean_s: u64,
    /// Fleet: read pickup codes from this file (followed like `tail -f`) or `-` for stdin,
    /// one per line as "CALL_ID CODE" or a JSON create answer; couriers holding those
    /// calls then mark them picked up and completed.
    #[arg(long)]
    pub pickup_codes: Option<String>,
    /// Send an unanswered reply again after this many ms (doubling up to a minute).
    #[arg(long, default_value_t = 5_000)]
    pub answer_timeout_ms: u64,
}

/// What to run.
#[derive(Debug)]
pub enum Run {
    /// One courier.
    Single {
        /// The agent.
        agent: Box<AgentConfig>,
        /// How the console behaves.
        console: ConsoleOptions,
    },
    /// A simulated fleet.
    Fleet(Box<FleetConfig>),
}

fn parse_center(s: &str) -> Result<Point, ConfigError> {
    let bad = || {
        ConfigError::new(format!(
            "--center: expected LAT,LON like 37.5,127.0, got {s:?}"
        ))
    };
    let (a, b) = s.split_once(',').ok_or_else(bad)?;
    let lat: f64 = a.trim().parse().map_err(|_| bad())?;
    let lon: f64 = b.trim().parse().map_err(|_| bad())?;
    pickup_protocol::validate::lat_lon("--center", lat, lon)
        .map_err(|e| ConfigError::new(e.replace("--center.", "--center ")))?;
    Ok(Point::new(lat, lon))
}

impl Cli {
    /// Checks the flags and builds what to run; errors name the flag.
    pub fn into_run(self) -> Result<Run, ConfigError> {
        let broker = BrokerUrl::parse(&self.broker)
            .map_err(|e| ConfigError::new(format!("--broker: {e}")))?;
        let vehicle = Vehicle::parse(&self.vehicle).ok_or_else(|| {
            ConfigError::new(format!(
                "--vehicle: must be bicycle, scooter, car, van or truck, got {:?}",
                self.vehicle
            ))
        })?;
        let version = match self.mqtt_version {
            4 => Version::V4,
            5 => Version::V5,
            v => {
                return Err(ConfigError::new(format!(
                    "--mqtt-version: must be 4 or 5, got {v}"
                )))
            }
        };
        let credentials = match (self.user, self.password) {
            (Some(u), Some(p)) => Some((u, p)),
            (Some(u), None) => Some((u, String::new())),
            (None, Some(_)) => {
                return Err(ConfigError::new("--password: given without --user"));
            }
            (None, None) => None,
        };
        if self.location_interval_s == 0 {
            return Err(ConfigError::new(
                "--location-interval-s: must be at least 1",
            ));
        }
        if self.keep_alive_s == 0 {
            return Err(ConfigError::new("--keep-alive-s: must be at least 1"));
        }
        if self.answer_timeout_ms < 100 {
            return Err(ConfigError::new(
                "--answer-timeout-ms: must be at least 100",
            ));
        }
        let answer_timeout = Duration::from_millis(self.answer_timeout_ms);
        let policy = Policy {
            auto_answer: self.auto_accept || self.decline_rate.is_some() || self.simulate.is_some(),
            decline_rate: self.decline_rate.unwrap_or(0.0),
            think_ms: if self.simulate.is_some() {
                (300, 3000)
            } else {
                (0, 0)
            },
            complete_after: self
                .auto_complete_after_ms
                .or(self.simulate.map(|_| 10_000))
                .map(Duration::from_millis),
            seed: self.seed,
        };
        policy.validate()?;
        let position = match (self.lat, self.lon) {
            (Some(lat), Some(lon)) => Some(Point::new(lat, lon)),
            (None, None) => None,
            (Some(_), None) => return Err(ConfigError::new("--lon: required with --lat")),
            (None, Some(_)) => return Err(ConfigError::new("--lat: required with --lon")),
        };

        if let Some(n) = self.simulate {
            if n == 0 || n > 100_000 {
                return Err(ConfigError::new("--simulate: must be 1 to 100000 couriers"));
            }
            let center = match (&self.center, position) {
                (Some(c), _) => parse_center(c)?,
                (None, Some(p)) => p,
                (None, None) => Point::new(37.5665, 126.978),
            };
            if !self.radius_m.is_finite() || self.radius_m <= 0.0 || self.radius_m > 200_000.0 {
                return Err(ConfigError::new(
                    "--radius-m: must be a number of metres from 1 to 200000",
                ));
            }
            if self.tick_ms < 10 {
                return Err(ConfigError::new("--tick-ms: must be at least 10"));
            }
            let prefix = self.id.unwrap_or_else(|| "sim".into());
            let mut template = AgentConfig::new(broker, &self.site, &prefix, vehicle, center);
            template.credentials = credentials;
            template.version = version;
            template.policy = policy;
            template.location_interval = Duration::from_secs(self.location_interval_s);
            template.move_threshold_m = self.move_threshold_m;
            template.will_delay_s = self.will_delay_s;
            template.keep_alive_s = self.keep_alive_s;
            template.reconnect_max = Duration::from_millis(self.reconnect_max_ms.max(100));
            template.channel_capacity = 512;
            template.answer_timeout = answer_timeout;
            template.queue = QueueStore::Memory;
            let fleet = FleetConfig {
                template,
                count: n,
                id_prefix: prefix,
                center,
                radius_m: self.radius_m,
                seed: self.seed.unwrap_or_else(rand::random),
                tick: Duration::from_millis(self.tick_ms),
                shift_on_mean: Duration::from_secs(self.shift_on_mean_s),
                shift_off_mean: Duration::from_secs(self.shift_off_mean_s.max(1)),
                queue_dir: self.queue_dir,
                json: self.json,
                pickup_codes: match self.pickup_codes.as_deref() {
                    Some("") => {
                        return Err(ConfigError::new(
                            "--pickup-codes: expected a file path or - for stdin",
                        ))
                    }
                    Some(s) => Some(CodeSource::parse(s)),
                    None => None,
                },
            };
            fleet.validate()?;
            return Ok(Run::Fleet(Box::new(fleet)));
        }

        if self.pickup_codes.is_some() {
            return Err(ConfigError::new(
                "--pickup-codes: only with --simulate (one courier types the code: picked <code>)",
            ));
        }
        let id = self
            .id
            .ok_or_else(|| ConfigError::new("--id: required (the courier id)"))?;
        let position = position.ok_or_else(|| {
            ConfigError::new("--lat/--lon: required (where the courier is at start)")
        })?;
        let mut c = AgentConfig::new(broker, &self.site, &id, vehicle, position);
        if let Some(cid) = self.client_id {
            c.client_id = cid;
        }
        c.name = self.name;
        c.tel = self.tel;
        c.available = !self.off_shift;
        c.credentials = credentials;
        c.version = version;
        if let Some(q) = self.queue_file {
            c.queue = QueueStore::File(q);
        }
        c.policy = policy;
        c.location_interval = Duration::from_secs(self.location_interval_s);
        c.move_threshold_m = self.move_threshold_m;
        c.will_delay_s = self.will_delay_s;
        c.keep_alive_s = self.keep_alive_s;
        c.reconnect_max = Duration::from_millis(self.reconnect_max_ms.max(100));
        c.answer_timeout = answer_timeout;
        c.validate()?;
        Ok(Run::Single {
            agent: Box::new(c),
            console: ConsoleOptions {
                json: self.json,
                read_input: !self.no_input,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Run, ConfigError> {
        let mut v = vec!["courier-agent"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).unwrap().into_run()
    }

    #[test]
    fn the_documented_example_parses() {
        let r = run(&[
            "--broker",
            "mqtt://127.0.0.1:1883",
            "--site",
            "default",
            "--id",
            "k1",
            "--name",
            "Kim",
            "--vehicle",
            "scooter",
            "--tel",
            "010-1234-5678",
            "--lat",
            "37.5",
            "--lon",
            "127.0",
            "--auto-accept",
            "--decline-rate",
            "0.2",
        ])
        .unwrap();
        let Run::Single { agent, console } = r else {
            panic!("expected one agent")
        };
        assert_eq!(agent.courier_id, "k1");
        assert_eq!(agent.client_id, "courier-k1");
        assert!(agent.policy.auto_answer);
        assert_eq!(agent.policy.decline_rate, 0.2);
        assert!(console.read_input);
    }

    #[test]
    fn bad_flags_are_named() {
        let e = |a: &[&str]| run(a).unwrap_err().0;
        assert!(e(&["--lat", "1", "--lon", "2"]).starts_with("--id"));
        assert!(e(&["--id", "k"]).starts_with("--lat/--lon"));
        assert!(e(&["--id", "k", "--lat", "95", "--lon", "2"]).starts_with("--lat"));
        assert!(
            e(&["--id", "k", "--lat", "1", "--lon", "2", "--vehicle", "jet"])
                .starts_with("--vehicle")
        );
        assert!(e(&[
            "--id",
            "k",
            "--lat",
            "1",
            "--lon",
            "2",
            "--mqtt-version",
            "3"
        ])
        .starts_with("--mqtt-version"));
        assert!(e(&[
            "--id",
            "k",
            "--lat",
            "1",
            "--lon",
            "2",
            "--decline-rate",
            "2"
        ])
        .starts_with("--decline-rate"));
        assert!(
            e(&["--id", "k", "--lat", "1", "--lon", "2", "--broker", "http://x"])
                .starts_with("--broker")
        );
        assert!(e(&["--simulate", "3", "--center", "37.5"]).starts_with("--center"));
        assert!(e(&["--simulate", "3", "--center", "37.5,200"]).starts_with("--center"));
        assert!(e(&["--simulate", "0"]).starts_with("--simulate"));
        assert!(e(&[
            "--id",
            "k",
            "--lat",
            "1",
            "--lon",
            "2",
            "--pickup-codes",
            "-"
        ])
        .starts_with("--pickup-codes"));
        assert!(e(&[
            "--id",
            "k",
            "--lat",
            "1",
            "--lon",
            "2",
            "--answer-timeout-ms",
            "5"
        ])
        .starts_with("--answer-timeout-ms"));
    }

    #[test]
    fn simulate_builds_a_fleet() {
        let r = run(&[
            "--simulate",
            "5",
            "--center",
            "37.5,-0.1",
            "--radius-m",
            "800",
            "--seed",
            "7",
        ])
        .unwrap();
        let Run::Fleet(f) = r else {
            panic!("expected a fleet")
        };
        assert_eq!(f.count, 5);
        assert_eq!(f.seed, 7);
        assert_eq!(f.center, Point::new(37.5, -0.1));
        assert!(f.template.policy.auto_answer);
        assert_eq!(f.pickup_codes, None);
        let Run::Fleet(f) = run(&["--simulate", "2", "--pickup-codes", "-"]).unwrap() else {
            panic!("expected a fleet")
        };
        assert_eq!(f.pickup_codes, Some(CodeSource::Stdin));
    }
}
