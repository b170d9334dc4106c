//! The `[[scales]]` tables of the config: how to reach each scale and how to turn its
//! registers into kilograms. [`ScaleConfig`] is what the file says; [`validate_scales`] checks
//! it and yields [`ScaleSpec`]s, the only form the poller accepts, so a poller never runs
//! on a half-checked config. Every error names the key to fix (`scales[1].format: ...`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::breaker::BreakerConfig;

/// The standard Modbus TCP port, used when `address` gives none.
pub const MODBUS_TCP_PORT: u16 = 502;

/// A config error: the key (`scales[0].address`) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ScaleConfigError {
    /// Path of the offending key.
    pub key: String,
    /// What is wrong and, where possible, what would be right.
    pub message: String,
}

impl ScaleConfigError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Which Modbus table the value lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegisterType {
    /// Holding registers (function 0x03); most scale indicators use these.
    Holding,
    /// Input registers (function 0x04).
    Input,
}

/// How the weight is encoded in the registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// One register, unsigned.
    U16,
    /// One register, two's complement.
    I16,
    /// Two registers, unsigned.
    U32,
    /// Two registers, two's complement.
    I32,
    /// Two registers, IEEE 754 single precision.
    F32,
}

impl DataFormat {
    /// How many 16-bit registers one value takes.
    pub fn words(self) -> u16 {
        match self {
            Self::U16 | Self::I16 => 1,
            Self::U32 | Self::I32 | Self::F32 => 2,
        }
    }
}

/// Order of the two registers of a 32-bit value (bytes inside each register are always
/// big-endian, as Modbus defines).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WordOrder {
    /// High word first (ABCD), the Modbus convention.
    #[default]
    Big,
    /// Low word first (CDAB), common on indicators with little-endian firmware.
    Little,
}

/// The unit the scale reports in (after the scale factor); readings are always converted
/// to kilograms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightUnit {
    /// Kilograms.
    Kg,
    /// Grams.
    G,
    /// Avoirdupois pounds.
    Lb,
}

impl WeightUnit {
    /// Kilograms per one of this unit.
    pub fn kg_per_unit(self) -> f64 {
        match self {
            Self::Kg => 1.0,
            Self::G => 0.001,
            Self::Lb => 0.453_592_37,
        }
    }
}

/// Serial parity for RTU scales.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Parity {
    /// No parity bit (8N1 is the usual Modbus RTU setting with 2 stop bits, or 1 in practice).
    #[default]
    None,
    /// Even parity (the Modbus RTU default per the specification).
    Even,
    /// Odd parity.
    Odd,
}

/// The optional status register: which bits say stable, in motion, overload and empty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    /// Register address of the status word.
    pub register: u16,
    /// Table of the status word; defaults to the weight's `register_type`.
    #[serde(default)]
    pub register_type: Option<RegisterType>,
    /// Bit (0 = least significant) set while the weight is stable.
    #[serde(default)]
    pub stable_bit: Option<u8>,
    /// Bit set while the weight is in motion, for indicators that report that instead.
    #[serde(default)]
    pub motion_bit: Option<u8>,
    /// Bit set when the load is beyond the scale's range.
    #[serde(default)]
    pub overload_bit: Option<u8>,
    /// Bit set when the scale is at zero (nothing on it).
    #[serde(default)]
    pub zero_bit: Option<u8>,
}

/// One `[[scales]]` table as written in the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleConfig {
    /// Scale id, used in `scales/<id>/weight` and in a call's `scale_id`.
    pub id: String,
    /// Kiosks whose parcels stand on this scale.
    #[serde(default)]
    pub kiosks: Vec<String>,
    /// Modbus TCP `host:port` (port defaults to 502). Either this or `device`.
    #[serde(default)]
    pub address: Option<String>,
    /// Serial device of a Modbus RTU scale (`/dev/ttyUSB0`); needs the `rtu` build feature.
    #[serde(default)]
    pub device: Option<String>,
    /// RTU baud rate.
    #[serde(default)]
    pub baud: Option<u32>,
    /// RTU parity.
    #[serde(default)]
    pub parity: Option<Parity>,
    /// RTU data bits (7 or 8).
    #[serde(default)]
    pub data_bits: Option<u8>,
    /// RTU stop bits (1 or 2).
    #[serde(default)]
    pub stop_bits: Option<u8>,
    /// Modbus unit (slave) id; TCP devices often ignore it, gateways need it.
    #[serde(default = "default_unit_id")]
    pub unit_id: u8,
    /// Table holding the weight.
    #[serde(default = "default_register_type")]
    pub register_type: RegisterType,
    /// Address of the (first) weight register, zero-based as on the wire.
    pub register: u16,
    /// Encoding of the weight.
    pub format: DataFormat,
    /// Register order of 32-bit formats.
    #[serde(default)]
    pub word_order: WordOrder,
    /// Raw value times this gives the weight in `unit` (e.g. 0.01 for a value in 10 g steps
    /// with `unit = "kg"`).
    #[serde(default = "default_scale_factor")]
    pub scale_factor: f64,
    /// Unit of raw value × scale factor.
    pub unit: WeightUnit,
    /// Status register; without it stability is judged from successive readings.
    #[serde(default)]
    pub status: Option<StatusConfig>,
    /// Loads at or above this many kilograms count as overload (for scales without an
    /// overload bit, or as a second guard).
    #[serde(default)]
    pub capacity_kg: Option<f64>,
    /// Without a stable or motion bit: readings this close together (kg) count as the same.
    /// Also the band around zero that counts as "empty" without a zero bit.
    #[serde(default = "default_stable_tolerance_kg")]
    pub stable_tolerance_kg: f64,
    /// Without a stable or motion bit: this many consecutive readings within the tolerance
    /// make a stable one.
    #[serde(default = "default_stable_samples")]
    pub stable_samples: u32,
    /// Time between two reads, ms.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// Longest wait for a connection or an answer, ms. tokio-modbus itself never gives up.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// A reading older than this many ms is not used for a call.
    #[serde(default = "default_max_age_ms")]
    pub max_age_ms: u64,
    /// First wait before reconnecting after a transport error, ms; doubles up to the max.
    #[serde(default = "default_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    /// Longest wait between reconnection attempts, ms.
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// Unchanged readings are reported again after this many ms, so the retained topic
    /// shows the scale is alive; changed readings are reported at once.
    #[serde(default = "default_report_every_ms")]
    pub report_every_ms: u64,
    /// When to stop asking a scale that keeps failing.
    #[serde(default = "default_scale_breaker")]
    pub breaker: BreakerConfig,
}

fn default_unit_id() -> u8 {
    1
}
fn default_register_type() -> RegisterType {
    RegisterType::Holding
}
fn default_scale_factor() -> f64 {
    1.0
}
fn default_stable_tolerance_kg() -> f64 {
    0.02
}
fn default_stable_samples() -> u32 {
    3
}
fn default_poll_interval_ms() -> u64 {
    250
}
fn default_request_timeout_ms() -> u64 {
    1_000
}
fn default_max_age_ms() -> u64 {
    2_000
}
fn default_reconnect_min_ms() -> u64 {
    500
}
fn default_reconnect_max_ms() -> u64 {
    30_000
}
fn default_report_every_ms() -> u64 {
    10_000
}
/// A scale that failed three reads in a row is left alone for 5 s, then up to a minute.
pub fn default_scale_breaker() -> BreakerConfig {
    BreakerConfig {
        consecutive_failures: 3,
        open_ms: 5_000,
        max_open_ms: Some(60_000),
        ..BreakerConfig::default()
    }
}

/// How the daemon reaches a scale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// Modbus TCP to `host:port`, resolved at each connection attempt (DHCP names move).
    Tcp {
        /// `host:port`.
        address: String,
    },
    /// Modbus RTU over a serial line.
    #[cfg(feature = "rtu")]
    Rtu {
        /// Serial device path.
        device: String,
        /// Baud rate.
        baud: u32,
        /// Parity.
        parity: Parity,
        /// Data bits (7 or 8).
        data_bits: u8,
        /// Stop bits (1 or 2).
        stop_bits: u8,
    },
}

/// Where a value sits: table and address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegisterRef {
    /// Table.
    pub kind: RegisterType,
    /// Zero-based address.
    pub address: u16,
}

/// The checked status register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusSpec {
    /// Where the status word sits.
    pub at: RegisterRef,
    /// Bit set while stable.
    pub stable_bit: Option<u8>,
    /// Bit set while in motion.
    pub motion_bit: Option<u8>,
    /// Bit set on overload.
    pub overload_bit: Option<u8>,
    /// Bit set at zero.
    pub zero_bit: Option<u8>,
}

impl StatusSpec {
    /// Whether the device itself says when a weight is stable.
    pub fn reports_stability(&self) -> bool {
        self.stable_bit.is_some() || self.motion_bit.is_some()
    }
}

/// A checked scale config, ready for a poller.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleSpec {
    /// Scale id.
    pub id: String,
    /// Kiosks bound to it.
    pub kiosks: Vec<String>,
    /// How to reach it.
    pub transport: Transport,
    /// Modbus unit id.
    pub unit_id: u8,
    /// Where the weight sits.
    pub weight: RegisterRef,
    /// Weight encoding.
    pub format: DataFormat,
    /// Register order of 32-bit values.
    pub word_order: WordOrder,
    /// Kilograms per raw count (scale factor × unit conversion).
    pub kg_per_count: f64,
    /// Status register, if any.
    pub status: Option<StatusSpec>,
    /// Overload from this many kg.
    pub capacity_kg: Option<f64>,
    /// Tolerance for software stability and the zero band, kg.
    pub stable_tolerance_kg: f64,
    /// Readings within tolerance needed for software stability.
    pub stable_samples: u32,
    /// Time between reads.
    pub poll_interval: Duration,
    /// Longest wait for a connection or an answer.
    pub request_timeout: Duration,
    /// Oldest usable reading, ms.
    pub max_age_ms: u64,
    /// Reconnect backoff start.
    pub reconnect_min: Duration,
    /// Reconnect backoff cap.
    pub reconnect_max: Duration,
    /// Heartbeat of unchanged readings, ms.
    pub report_every_ms: u64,
    /// Breaker thresholds.
    pub breaker: BreakerConfig,
}

/// The largest number of registers read in one request when the weight and status
/// registers are close enough to be fetched together.
const MAX_JOINT_READ: u16 = 32;

impl ScaleSpec {
    /// The read requests one poll makes: (table, first address, count). The weight and a
    /// nearby status word in the same table come in a single request.
    pub fn reads(&self) -> Vec<(RegisterType, u16, u16)> {
        let w = self.weight;
        let n = self.format.words();
        match &self.status {
            None => vec![(w.kind, w.address, n)],
            Some(s) if s.at.kind == w.kind => {
                let start = w.address.min(s.at.address);
                let end = (u32::from(w.address) + u32::from(n)).max(u32::from(s.at.address) + 1);
                let span = end - u32::from(start);
                if span <= u32::from(MAX_JOINT_READ) {
                    vec![(w.kind, start, span as u16)]
                } else {
                    vec![(w.kind, w.address, n), (s.at.kind, s.at.address, 1)]
                }
            }
            Some(s) => vec![(w.kind, w.address, n), (s.at.kind, s.at.address, 1)],
        }
    }
}

/// Parses the `[[scales]]` tables of a TOML document (other tables are ignored) and checks
/// them. Errors carry the key path (`scales[0].word_order`).
pub fn parse_scales_toml(text: &str) -> Result<Vec<ScaleSpec>, ScaleConfigError> {
    #[derive(Deserialize)]
    struct Doc {
        #[serde(default)]
        scales: Vec<ScaleConfig>,
    }
    let de = toml::Deserializer::parse(text)
        .map_err(|e| ScaleConfigError::new("config", e.to_string()))?;
    let doc: Doc = serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        ScaleConfigError::new(key, e.into_inner().message().to_string())
    })?;
    validate_scales(&doc.scales)
}

/// Checks every scale and the relations between them (unique ids, a kiosk on one scale).
pub fn validate_scales(scales: &[ScaleConfig]) -> Result<Vec<ScaleSpec>, ScaleConfigError> {
    let mut ids: HashMap<&str, usize> = HashMap::new();
    let mut kiosks: HashMap<&str, &str> = HashMap::new();
    let mut out = Vec::with_capacity(scales.len());
    for (i, s) in scales.iter().enumerate() {
        let key = format!("scales[{i}]");
        if let Some(prev) = ids.insert(s.id.as_str(), i) {
            return Err(ScaleConfigError::new(
                format!("{key}.id"),
                format!("\"{}\" is already the id of scales[{prev}]", s.id),
            ));
        }
        for (k, kiosk) in s.kiosks.iter().enumerate() {
            if let Some(other) = kiosks.insert(kiosk.as_str(), s.id.as_str()) {
                return Err(ScaleConfigError::new(
                    format!("{key}.kiosks[{k}]"),
                    format!("kiosk \"{kiosk}\" is already bound to scale \"{other}\""),
                ));
            }
        }
        out.push(s.validate(&key)?);
    }
    Ok(out)
}

fn check_bit(key: &str, bit: Option<u8>) -> Result<Option<u8>, ScaleConfigError> {
    match bit {
        Some(b) if b > 15 => Err(ScaleConfigError::new(
            key,
            format!("bit {b} does not exist in a 16-bit register (0..=15)"),
        )),
        b => Ok(b),
    }
}

fn check_id(key: &str, id: &str) -> Result<(), ScaleConfigError> {
    pickup_protocol::validate::id(key, id).map_err(|e| {
        // The protocol's message starts with the field name it was given; keep only the rest.
        let msg = e
            .strip_prefix(key)
            .map(|m| m.trim_start_matches(':').trim())
            .unwrap_or(&e);
        ScaleConfigError::new(key, msg.to_string())
    })
}

/// Accepts `host:port`, `[v6]:port`, or a bare host (port 502).
fn check_address(key: &str, address: &str) -> Result<String, ScaleConfigError> {
    let address = address.trim();
    if address.parse::<SocketAddr>().is_ok() {
        return Ok(address.to_string());
    }
    if address.parse::<std::net::Ipv6Addr>().is_ok() {
        return Ok(format!("[{address}]:{MODBUS_TCP_PORT}"));
    }
    match address.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !host.contains(':') => {
            match port.parse::<u16>() {
                Ok(p) if p > 0 => Ok(address.to_string()),
                _ => Err(ScaleConfigError::new(
                    key,
                    format!("\"{address}\": port must be a number from 1 to 65535"),
                )),
            }
        }
        None if !address.is_empty() && !address.contains(char::is_whitespace) => {
            Ok(format!("{address}:{MODBUS_TCP_PORT}"))
        }
        _ => Err(ScaleConfigError::new(
            key,
            format!("\"{address}\" is not host:port"),
        )),
    }
}

impl ScaleConfig {
    /// Checks this scale on its own; `key` is its place in the file (`scales[0]`).
    pub fn validate(&self, key: &str) -> Result<ScaleSpec, ScaleConfigError> {
        let k = |field: &str| format!("{key}.{field}");
        check_id(&k("id"), &self.id)?;
        for (i, kiosk) in self.kiosks.iter().enumerate() {
            check_id(&k(&format!("kiosks[{i}]")), kiosk)?;
        }
        let transport = self.transport(key)?;
        if !(self.scale_factor.is_finite() && self.scale_factor != 0.0) {
            return Err(ScaleConfigError::new(
                k("scale_factor"),
                format!(
                    "must be a finite number other than 0, got {}",
                    self.scale_factor
                ),
            ));
        }
        if u32::from(self.register) + u32::from(self.format.words()) > 0x1_0000 {
            return Err(ScaleConfigError::new(
                k("register"),
                format!(
                    "a {:?} value at {} runs past the last register 65535",
                    self.format, self.register
                ),
            ));
        }
        let status = match &self.status {
            None => None,
            Some(st) => {
                let sk = |f: &str| format!("{key}.status.{f}");
                if st.stable_bit.is_some() && st.motion_bit.is_some() {
                    return Err(ScaleConfigError::new(
                        sk("motion_bit"),
                        "set stable_bit or motion_bit, not both",
                    ));
                }
                let spec = StatusSpec {
                    at: RegisterRef {
                        kind: st.register_type.unwrap_or(self.register_type),
                        address: st.register,
                    },
                    stable_bit: check_bit(&sk("stable_bit"), st.stable_bit)?,
                    motion_bit: check_bit(&sk("motion_bit"), st.motion_bit)?,
                    overload_bit: check_bit(&sk("overload_bit"), st.overload_bit)?,
                    zero_bit: check_bit(&sk("zero_bit"), st.zero_bit)?,
                };
                if spec.stable_bit.is_none()
                    && spec.motion_bit.is_none()
                    && spec.overload_bit.is_none()
                    && spec.zero_bit.is_none()
                {
                    return Err(ScaleConfigError::new(
                        sk("register"),
                        "a status register needs at least one of stable_bit, motion_bit, overload_bit, zero_bit",
                    ));
                }
                Some(spec)
            }
        };
        if let Some(c) = self.capacity_kg {
            if !(c.is_finite() && c > 0.0) {
                return Err(ScaleConfigError::new(
                    k("capacity_kg"),
                    format!("must be a positive number, got {c}"),
                ));
            }
        }
        if !(self.stable_tolerance_kg.is_finite() && self.stable_tolerance_kg >= 0.0) {
            return Err(ScaleConfigError::new(
                k("stable_tolerance_kg"),
                format!("must be 0 or more, got {}", self.stable_tolerance_kg),
            ));
        }
        if self.stable_samples == 0 {
            return Err(ScaleConfigError::new(
                k("stable_samples"),
                "must be at least 1",
            ));
        }
        for (name, v) in [
            ("poll_interval_ms", self.poll_interval_ms),
            ("request_timeout_ms", self.request_timeout_ms),
            ("max_age_ms", self.max_age_ms),
            ("reconnect_min_ms", self.reconnect_min_ms),
            ("report_every_ms", self.report_every_ms),
        ] {
            if v == 0 {
                return Err(ScaleConfigError::new(k(name), "must be above 0"));
            }
        }
        if self.max_age_ms < self.poll_interval_ms {
            return Err(ScaleConfigError::new(
                k("max_age_ms"),
                format!(
                    "{} is below poll_interval_ms {}: no reading would ever be fresh",
                    self.max_age_ms, self.poll_interval_ms
                ),
            ));
        }
        if self.reconnect_max_ms < self.reconnect_min_ms {
            return Err(ScaleConfigError::new(
                k("reconnect_max_ms"),
                format!(
                    "{} is below reconnect_min_ms {}",
                    self.reconnect_max_ms, self.reconnect_min_ms
                ),
            ));
        }
        self.breaker
            .validate(&k("breaker"))
            .map_err(|e| match e.split_once(": ") {
                Some((key, msg)) => ScaleConfigError::new(key, msg),
                None => ScaleConfigError::new(k("breaker"), e),
            })?;
        Ok(ScaleSpec {
            id: self.id.clone(),
            kiosks: self.kiosks.clone(),
            transport,
            unit_id: self.unit_id,
            weight: RegisterRef {
                kind: self.register_type,
                address: self.register,
            },
            format: self.format,
            word_order: self.word_order,
            kg_per_count: self.scale_factor * self.unit.kg_per_unit(),
            status,
            capacity_kg: self.capacity_kg,
            stable_tolerance_kg: self.stable_tolerance_kg,
            stable_samples: self.stable_samples,
            poll_interval: Duration::from_millis(self.poll_interval_ms),
            request_timeout: Duration::from_millis(self.request_timeout_ms),
            max_age_ms: self.max_age_ms,
            reconnect_min: Duration::from_millis(self.reconnect_min_ms),
            reconnect_max: Duration::from_millis(self.reconnect_max_ms),
            report_every_ms: self.report_every_ms,
            breaker: self.breaker.clone(),
        })
    }

    fn transport(&self, key: &str) -> Result<Transport, ScaleConfigError> {
        let k = |field: &str| format!("{key}.{field}");
        match (&self.address, &self.device) {
            (Some(_), Some(_)) => Err(ScaleConfigError::new(
                k("device"),
                "set address (Modbus TCP) or device (Modbus RTU), not both",
            )),
            (None, None) => Err(ScaleConfigError::new(
                k("address"),
                "missing: set address = \"host:port\" (Modbus TCP) or device = \"/dev/tty...\" (Modbus RTU)",
            )),
            (Some(address), None) => {
                for (name, set) in [
                    ("baud", self.baud.is_some()),
                    ("parity", self.parity.is_some()),
                    ("data_bits", self.data_bits.is_some()),
                    ("stop_bits", self.stop_bits.is_some()),
                ] {
                    if set {
                        return Err(ScaleConfigError::new(
                            k(name),
                            "only applies to serial (device) scales",
                        ));
                    }
                }
                Ok(Transport::Tcp {
                    address: check_address(&k("address"), address)?,
                })
            }
            (None, Some(device)) => self.rtu_transport(key, device),
        }
    }

    #[cfg(feature = "rtu")]
    fn rtu_transport(&self, key: &str, device: &str) -> Result<Transport, ScaleConfigError> {
        let k = |field: &str| format!("{key}.{field}");
        if device.trim().is_empty() {
            return Err(ScaleConfigError::new(k("device"), "must not be empty"));
        }
        let baud = self.baud.unwrap_or(9_600);
        if baud == 0 {
            return Err(ScaleConfigError::new(k("baud"), "must be above 0"));
        }
        let data_bits = self.data_bits.unwrap_or(8);
        if !matches!(data_bits, 7 | 8) {
            return Err(ScaleConfigError::new(
                k("data_bits"),
                format!("must be 7 or 8, got {data_bits}"),
            ));
        }
        let stop_bits = self.stop_bits.unwrap_or(1);
        if !matches!(stop_bits, 1 | 2) {
            return Err(ScaleConfigError::new(
                k("stop_bits"),
                format!("must be 1 or 2, got {stop_bits}"),
            ));
        }
        Ok(Transport::Rtu {
            device: device.to_string(),
            baud,
            parity: self.parity.unwrap_or_default(),
            data_bits,
            stop_bits,
        })
    }

    #[cfg(not(feature = "rtu"))]
    fn rtu_transport(&self, key: &str, _device: &str) -> Result<Transport, ScaleConfigError> {
        Err(ScaleConfigError::new(
            format!("{key}.device"),
            "serial (Modbus RTU) scales need pickupd built with the `rtu` feature; use a Modbus TCP address or rebuild with --features rtu",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[[scales]]
id = "s1"
kiosks = ["k1", "k2"]
address = "127.0.0.1:1502"
register = 100
format = "i32"
unit = "g"
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let specs = parse_scales_toml(MINIMAL).unwrap();
        assert_eq!(specs.len(), 1);
        let s = &specs[0];
        assert_eq!(s.id, "s1");
        assert_eq!(s.kiosks, vec!["k1", "k2"]);
        assert_eq!(
            s.transport,
            Transport::Tcp {
                address: "127.0.0.1:1502".into()
            }
        );
        assert_eq!(s.unit_id, 1);
        assert_eq!(s.weight.kind, RegisterType::Holding);
        assert_eq!(s.word_order, WordOrder::Big);
        assert!((s.kg_per_count - 0.001).abs() < 1e-12);
        assert_eq!(s.reads(), vec![(RegisterType::Holding, 100, 2)]);
        assert_eq!(s.breaker, default_scale_breaker());
        assert_eq!(s.max_age_ms, 2_000);
    }

    #[test]
    fn whole_numbers_are_accepted_for_decimal_keys() {
        let specs = parse_scales_toml(&with("scale_factor = 10\ncapacity_kg = 60")).unwrap();
        assert!((specs[0].kg_per_count - 0.01).abs() < 1e-12);
        assert_eq!(specs[0].capacity_kg, Some(60.0));
    }

    #[test]
    fn other_tables_are_ignored_and_no_scales_is_fine() {
        assert!(parse_scales_toml("[daemon]\nsite = \"x\"\n")
            .unwrap()
            .is_empty());
    }

    fn err(text: &str) -> ScaleConfigError {
        parse_scales_toml(text).unwrap_err()
    }

    fn with(extra: &str) -> String {
        format!("{MINIMAL}{extra}\n")
    }

    #[test]
    fn serde_errors_name_the_key() {
        let e = err(&with("word_order = \"middle\""));
        assert_eq!(e.key, "scales[0].word_order", "{e}");
        assert!(e.message.contains("middle"), "{e}");
        let e = err(&with("colour = 1"));
        assert!(e.message.contains("colour"), "{e}");
        assert!(e.key.starts_with("scales[0]"), "{e}");
        let e = err(&MINIMAL.replace("format = \"i32\"", "format = \"f64\""));
        assert_eq!(e.key, "scales[0].format", "{e}");
        let e = err(&MINIMAL.replace("register = 100", "register = 70000"));
        assert_eq!(e.key, "scales[0].register", "{e}");
        let e = err(&MINIMAL.replace("format = \"i32\"\n", ""));
        assert!(e.message.contains("format"), "{e}");
        let e = err(&with(
            "[scales.status]\nregister = 1\nstable_bit = 0\nblink_bit = 3",
        ));
        assert!(e.key.starts_with("scales[0].status"), "{e}");
        assert!(e.message.contains("blink_bit"), "{e}");
    }

    #[test]
    fn semantic_errors_name_the_key() {
        let cases: &[(&str, &str)] = &[
            ("scale_factor = 0.0", "scales[0].scale_factor"),
            ("scale_factor = nan", "scales[0].scale_factor"),
            ("capacity_kg = -3.0", "scales[0].capacity_kg"),
            ("stable_samples = 0", "scales[0].stable_samples"),
            ("request_timeout_ms = 0", "scales[0].request_timeout_ms"),
            (
                "poll_interval_ms = 5000\nmax_age_ms = 1000",
                "scales[0].max_age_ms",
            ),
            (
                "reconnect_min_ms = 5000\nreconnect_max_ms = 1000",
                "scales[0].reconnect_max_ms",
            ),
            ("baud = 9600", "scales[0].baud"),
            ("device = \"/dev/ttyUSB0\"", "scales[0].device"),
            ("[scales.breaker]\nopen_ms = 0", "scales[0].breaker.open_ms"),
            (
                "[scales.status]\nregister = 1\nstable_bit = 16",
                "scales[0].status.stable_bit",
            ),
            (
                "[scales.status]\nregister = 1\nstable_bit = 1\nmotion_bit = 2",
                "scales[0].status.motion_bit",
            ),
            ("[scales.status]\nregister = 1", "scales[0].status.register"),
        ];
        for (extra, key) in cases {
            let e = err(&with(extra));
            assert_eq!(e.key, *key, "{extra}: {e}");
        }
        let e = err(&MINIMAL.replace("address = \"127.0.0.1:1502\"\n", ""));
        assert_eq!(e.key, "scales[0].address", "{e}");
        let e = err(&MINIMAL.replace("127.0.0.1:1502", "host:notaport"));
        assert_eq!(e.key, "scales[0].address", "{e}");
        let e = err(&MINIMAL.replace("\"s1\"", "\"bad id!\""));
        assert_eq!(e.key, "scales[0].id", "{e}");
        assert!(!e.message.is_empty());
    }

    #[test]
    fn duplicate_ids_and_kiosks_are_refused() {
        let two = format!(
            "{MINIMAL}{}",
            MINIMAL.replace("kiosks = [\"k1\", \"k2\"]", "")
        );
        let e = err(&two);
        assert_eq!(e.key, "scales[1].id", "{e}");
        let two = format!(
            "{MINIMAL}{}",
            MINIMAL
                .replace("\"s1\"", "\"s2\"")
                .replace("[\"k1\", \"k2\"]", "[\"k3\", \"k2\"]")
        );
        let e = err(&two);
        assert_eq!(e.key, "scales[1].kiosks[1]", "{e}");
        assert!(e.message.contains("s1"), "{e}");
    }

    #[test]
    fn addresses_default_to_port_502() {
        for (given, want) in [
            ("10.0.0.5", "10.0.0.5:502"),
            ("scale.local", "scale.local:502"),
            ("scale.local:1502", "scale.local:1502"),
            ("::1", "[::1]:502"),
            ("[::1]:1502", "[::1]:1502"),
        ] {
            assert_eq!(check_address("a", given).unwrap(), want);
        }
        for bad in ["", "host:0", "host:", ":502", "a b"] {
            assert!(check_address("a", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn weight_and_nearby_status_are_read_together() {
        let specs = parse_scales_toml(&with(
            "[scales.status]\nregister = 102\nstable_bit = 0\noverload_bit = 1",
        ))
        .unwrap();
        assert_eq!(specs[0].reads(), vec![(RegisterType::Holding, 100, 3)]);
        let specs =
            parse_scales_toml(&with("[scales.status]\nregister = 98\nstable_bit = 0")).unwrap();
        assert_eq!(specs[0].reads(), vec![(RegisterType::Holding, 98, 4)]);
        let specs =
            parse_scales_toml(&with("[scales.status]\nregister = 500\nstable_bit = 0")).unwrap();
        assert_eq!(
            specs[0].reads(),
            vec![
                (RegisterType::Holding, 100, 2),
                (RegisterType::Holding, 500, 1)
            ]
        );
        let specs = parse_scales_toml(&with(
            "[scales.status]\nregister = 101\nregister_type = \"input\"\nzero_bit = 4",
        ))
        .unwrap();
        assert_eq!(
            specs[0].reads(),
            vec![
                (RegisterType::Holding, 100, 2),
                (RegisterType::Input, 101, 1)
            ]
        );
    }

    #[test]
    fn shipped_examples_parse() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/scales");
        let tcp = std::fs::read_to_string(format!("{dir}/generic-modbus-tcp.toml")).unwrap();
        let specs = parse_scales_toml(&tcp).unwrap();
        assert!(!specs.is_empty());
        let rtu = std::fs::read_to_string(format!("{dir}/generic-modbus-rtu.toml")).unwrap();
        let parsed = parse_scales_toml(&rtu);
        if cfg!(feature = "rtu") {
            assert!(parsed.is_ok(), "{parsed:?}");
        } else {
            let e = parsed.unwrap_err();
            assert!(e.key.ends_with(".device"), "{e}");
            assert!(e.message.contains("rtu"), "{e}");
        }
    }
}
