//! The courier handheld agent of pickupd, and a fleet simulator built from the same parts.
//!
//! Layout:
//! - [`agent`]: one courier: MQTT session with a last will, retained presence, location
//!   reports, the current job, the courier's actions, automatic answers by policy;
//! - [`delivery`]: which publishes the broker acknowledged (so a clean shutdown knows its
//!   "offline" presence is out);
//! - [`queue`]: the durable queue of replies, each kept until the daemon answers it;
//! - [`config`]: one agent's settings and their checks;
//! - [`codes`]: pickup codes handed to simulated couriers by a demo or load driver;
//! - [`cli`]: the command line, turned into an agent or a fleet configuration;
//! - [`console`]: the interactive front end (line commands in, human or JSON lines out);
//! - [`fleet`]: `--simulate N`: many couriers in one process, moving, changing shifts,
//!   answering offers by policy;
//! - [`geo`]: distances and small moves.

pub mod agent;
pub mod cli;
pub mod codes;
pub mod config;
pub mod console;
pub mod delivery;
pub mod fleet;
pub mod geo;
pub mod queue;

pub use agent::{Action, Agent, AgentError, AgentEvent, EventKind, LinkState, Status};
pub use config::{AgentConfig, ConfigError, Policy};
pub use geo::Point;
pub use queue::QueueStore;
