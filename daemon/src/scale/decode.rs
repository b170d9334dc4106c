//! From register words to a [`Reading`]: number formats, word order, unit conversion, status
//! bits, and stability judged from successive readings when the scale has no stable bit.
//! Pure code, table-tested; the poller only feeds it what the device answered.

use pickup_protocol::Millis;

use super::config::{DataFormat, RegisterRef, RegisterType, ScaleSpec, StatusSpec, WordOrder};
use super::Reading;

/// Why register words did not make a reading.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// The device answered fewer registers than asked for.
    #[error("{kind:?} register {address} was not in the answer")]
    Missing {
        /// Table.
        kind: RegisterType,
        /// Address.
        address: u16,
    },
    /// A float register pair held NaN or infinity.
    #[error("the weight registers hold {0}, not a number")]
    NotFinite(f32),
}

/// Decodes one raw value (before scale factor) from its registers.
pub fn decode_raw(words: &[u16], format: DataFormat, order: WordOrder) -> Option<f64> {
    let pair = || -> Option<u32> {
        let (a, b) = (*words.first()?, *words.get(1)?);
        let (hi, lo) = match order {
            WordOrder::Big => (a, b),
            WordOrder::Little => (b, a),
        };
        Some((u32::from(hi) << 16) | u32::from(lo))
    };
    Some(match format {
        DataFormat::U16 => f64::from(*words.first()?),
        DataFormat::I16 => f64::from(*words.first()? as i16),
        DataFormat::U32 => f64::from(pair()?),
        DataFormat::I32 => f64::from(pair()? as i32),
        DataFormat::F32 => f64::from(f32::from_bits(pair()?)),
    })
}

/// Encodes a raw value into registers: the inverse of [`decode_raw`], for test servers and
/// simulators. Values out of the format's range saturate.
pub fn encode_raw(value: f64, format: DataFormat, order: WordOrder) -> Vec<u16> {
    let split = |v: u32| {
        let (hi, lo) = ((v >> 16) as u16, v as u16);
        match order {
            WordOrder::Big => vec![hi, lo],
            WordOrder::Little => vec![lo, hi],
        }
    };
    match format {
        DataFormat::U16 => vec![value as u16],
        DataFormat::I16 => vec![value as i16 as u16],
        DataFormat::U32 => split(value as u32),
        DataFormat::I32 => split(value as i32 as u32),
        DataFormat::F32 => split((value as f32).to_bits()),
    }
}

/// Registers one poll returned: (table, first address, words).
pub type Block = (RegisterType, u16, Vec<u16>);

/// Finds `count` words at `at` in the blocks a poll returned.
fn words_at(blocks: &[Block], at: RegisterRef, count: u16) -> Result<&[u16], DecodeError> {
    for (kind, start, words) in blocks {
        if *kind != at.kind || at.address < *start {
            continue;
        }
        let from = usize::from(at.address - *start);
        if let Some(slice) = words.get(from..from + usize::from(count)) {
            return Ok(slice);
        }
    }
    Err(DecodeError::Missing {
        kind: at.kind,
        address: at.address,
    })
}

fn bit(word: u16, bit: Option<u8>) -> Option<bool> {
    bit.map(|b| word & (1u16 << (b & 15)) != 0)
}

/// Turns what a scale answered into readings; one per scale, because software stability
/// needs the previous readings.
#[derive(Debug, Clone)]
pub struct ReadingDecoder {
    weight: RegisterRef,
    format: DataFormat,
    word_order: WordOrder,
    kg_per_count: f64,
    status: Option<StatusSpec>,
    capacity_kg: Option<f64>,
    tolerance_kg: f64,
    stable_samples: u32,
    /// Weight of the current run of similar readings (software stability).
    run_weight: Option<f64>,
    /// Length of that run.
    run_len: u32,
}

impl ReadingDecoder {
    /// A decoder for one scale.
    pub fn new(spec: &ScaleSpec) -> Self {
        Self {
            weight: spec.weight,
            format: spec.format,
            word_order: spec.word_order,
            kg_per_count: spec.kg_per_count,
            status: spec.status.clone(),
            capacity_kg: spec.capacity_kg,
            tolerance_kg: spec.stable_tolerance_kg,
            stable_samples: spec.stable_samples,
            run_weight: None,
            run_len: 0,
        }
    }

    /// Forgets the run of similar readings (after the scale was unreachable: what lies on
    /// it now may be something else).
    pub fn reset(&mut self) {
        self.run_weight = None;
        self.run_len = 0;
    }

    /// Builds the reading from one poll's blocks, taken at wall-clock time `at`.
    pub fn decode(&mut self, blocks: &[Block], at: Millis) -> Result<Reading, DecodeError> {
        let words = words_at(blocks, self.weight, self.format.words())?;
        let raw = decode_raw(words, self.format, self.word_order).ok_or(DecodeError::Missing {
            kind: self.weight.kind,
            address: self.weight.address,
        })?;
        if !raw.is_finite() {
            return Err(DecodeError::NotFinite(raw as f32));
        }
        // Keep grams exact: 12.345000000000001 kg helps nobody.
        let weight_kg = (raw * self.kg_per_count * 1000.0).round() / 1000.0;

        let status_word = match &self.status {
            Some(s) => words_at(blocks, s.at, 1)?.first().copied(),
            None => None,
        };
        // Software stability is tracked on every reading, so it is ready the moment a
        // device without a stable bit settles.
        let software_stable = self.track(weight_kg);
        let status = self.status.as_ref();
        let by_bits =
            |f: fn(&StatusSpec) -> Option<u8>| -> Option<bool> { bit(status_word?, f(status?)) };
        let stable = match (by_bits(|s| s.stable_bit), by_bits(|s| s.motion_bit)) {
            (Some(stable), _) => stable,
            (None, Some(moving)) => !moving,
            (None, None) => software_stable,
        };
        let overload = by_bits(|s| s.overload_bit).unwrap_or(false)
            || self.capacity_kg.is_some_and(|c| weight_kg >= c);
        let zero = by_bits(|s| s.zero_bit).unwrap_or(weight_kg.abs() <= self.tolerance_kg);
        Ok(Reading {
            weight_kg,
            stable,
            overload,
            zero,
            at,
        })
    }

    /// Feeds a weight to the software stability run; true once the run is long enough.
    fn track(&mut self, weight_kg: f64) -> bool {
        match self.run_weight {
            Some(w) if (weight_kg - w).abs() <= self.tolerance_kg => {
                self.run_len = self.run_len.saturating_add(1);
            }
            _ => {
                self.run_weight = Some(weight_kg);
                self.run_len = 1;
            }
        }
        self.run_len >= self.stable_samples
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scale::config::parse_scales_toml;

    #[test]
    fn every_format_and_word_order_round_trips() {
        use DataFormat::*;
        use WordOrder::*;
        let cases: &[(DataFormat, WordOrder, f64, &[u16])] = &[
            (U16, Big, 12_345.0, &[12_345]),
            (U16, Big, 65_535.0, &[0xFFFF]),
            (I16, Big, -2.0, &[0xFFFE]),
            (I16, Big, 300.0, &[300]),
            (U32, Big, 123_456.0, &[0x0001, 0xE240]),
            (U32, Little, 123_456.0, &[0xE240, 0x0001]),
            (I32, Big, -123_456.0, &[0xFFFE, 0x1DC0]),
            (I32, Little, -123_456.0, &[0x1DC0, 0xFFFE]),
            (F32, Big, 12.5, &[0x4148, 0x0000]),
            (F32, Little, 12.5, &[0x0000, 0x4148]),
            (F32, Big, -0.25, &[0xBE80, 0x0000]),
        ];
        for (format, order, value, words) in cases {
            assert_eq!(
                decode_raw(words, *format, *order),
                Some(*value),
                "{format:?} {order:?}"
            );
            assert_eq!(
                encode_raw(*value, *format, *order),
                words.to_vec(),
                "{format:?} {order:?}"
            );
        }
        assert_eq!(decode_raw(&[1], U32, Big), None);
        assert_eq!(decode_raw(&[], U16, Big), None);
    }

    fn spec(extra: &str) -> ScaleSpec {
        let text =
            format!("[[scales]]\nid = \"s\"\naddress = \"127.0.0.1:1\"\nregister = 10\n{extra}\n");
        parse_scales_toml(&text).unwrap().remove(0)
    }

    #[test]
    fn scale_factor_and_unit_give_kilograms() {
        let mut d =
            ReadingDecoder::new(&spec("format = \"u16\"\nunit = \"g\"\nscale_factor = 10.0"));
        let r = d
            .decode(&[(RegisterType::Holding, 10, vec![1234])], 7)
            .unwrap();
        assert_eq!(r.weight_kg, 12.34);
        assert_eq!(r.at, 7);
        let mut d = ReadingDecoder::new(&spec("format = \"u16\"\nunit = \"lb\""));
        let r = d
            .decode(&[(RegisterType::Holding, 10, vec![22])], 0)
            .unwrap();
        assert_eq!(r.weight_kg, 9.979);
    }

    #[test]
    fn status_bits_decide_stable_overload_zero() {
        let s = spec(
            "format = \"u16\"\nunit = \"kg\"\nscale_factor = 0.01\n[scales.status]\nregister = 11\nstable_bit = 0\noverload_bit = 1\nzero_bit = 2",
        );
        let mut d = ReadingDecoder::new(&s);
        let block = |w: u16, st: u16| vec![(RegisterType::Holding, 10, vec![w, st])];
        let r = d.decode(&block(1250, 0b001), 0).unwrap();
        assert!(r.stable && !r.overload && !r.zero);
        assert_eq!(r.weight_kg, 12.5);
        let r = d.decode(&block(1250, 0b000), 0).unwrap();
        assert!(
            !r.stable,
            "the device says it is moving, however often we read"
        );
        let r = d.decode(&block(1250, 0b011), 0).unwrap();
        assert!(r.stable && r.overload);
        let r = d.decode(&block(0, 0b101), 0).unwrap();
        assert!(r.stable && r.zero);
        // Zero bit configured: a near-zero weight without the bit is not "zero".
        let r = d.decode(&block(1, 0b001), 0).unwrap();
        assert!(!r.zero);
    }

    #[test]
    fn a_motion_bit_is_the_inverse_of_stable() {
        let s =
            spec("format = \"u16\"\nunit = \"kg\"\n[scales.status]\nregister = 20\nmotion_bit = 3");
        let mut d = ReadingDecoder::new(&s);
        let blocks = |st: u16| {
            vec![
                (RegisterType::Holding, 10, vec![5]),
                (RegisterType::Holding, 20, vec![st]),
            ]
        };
        assert!(d.decode(&blocks(0), 0).unwrap().stable);
        assert!(!d.decode(&blocks(1 << 3), 0).unwrap().stable);
    }

    #[test]
    fn without_a_stable_bit_stability_needs_a_run_of_similar_readings() {
        let s = spec(
            "format = \"u16\"\nunit = \"g\"\nstable_samples = 3\nstable_tolerance_kg = 0.01\ncapacity_kg = 30.0",
        );
        let mut d = ReadingDecoder::new(&s);
        let mut read = |g: u16| {
            d.decode(&[(RegisterType::Holding, 10, vec![g])], 0)
                .unwrap()
        };
        assert!(!read(5000).stable);
        assert!(!read(5005).stable);
        assert!(read(4995).stable);
        assert!(read(5000).stable);
        assert!(!read(6000).stable, "a jump starts a new run");
        assert!(!read(6000).stable);
        assert!(read(6000).stable);
        assert!(read(30000).overload, "capacity reached");
        assert!(read(5).zero, "inside the zero band");
        assert!(!read(50).zero);
    }

    #[test]
    fn missing_registers_and_nan_are_errors_not_panics() {
        let s =
            spec("format = \"f32\"\nunit = \"kg\"\n[scales.status]\nregister = 12\nstable_bit = 0");
        let mut d = ReadingDecoder::new(&s);
        let e = d
            .decode(&[(RegisterType::Holding, 10, vec![0x4148])], 0)
            .unwrap_err();
        assert!(matches!(e, DecodeError::Missing { address: 10, .. }), "{e}");
        let e = d
            .decode(&[(RegisterType::Holding, 10, vec![0x4148, 0])], 0)
            .unwrap_err();
        assert!(matches!(e, DecodeError::Missing { address: 12, .. }), "{e}");
        let e = d
            .decode(&[(RegisterType::Input, 10, vec![0x4148, 0, 1])], 0)
            .unwrap_err();
        assert!(matches!(e, DecodeError::Missing { .. }), "wrong table: {e}");
        let e = d
            .decode(&[(RegisterType::Holding, 10, vec![0x7FC0, 0, 1])], 0)
            .unwrap_err();
        assert!(matches!(e, DecodeError::NotFinite(_)), "{e}");
    }
}
