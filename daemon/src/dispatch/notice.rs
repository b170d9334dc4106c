//! Customer notification texts: a template per event kind with `{name}` placeholders,
//! Korean and English defaults, overridable from the config.

use std::collections::BTreeMap;

use pickup_protocol::Vehicle;
use serde::{Deserialize, Serialize};

/// Template keys, one per customer-visible event.
pub const KEYS: [&str; 6] = [
    "call.accepted",
    "call.assigned",
    "call.picked_up",
    "call.completed",
    "call.cancelled",
    "call.failed",
];

/// The variables each notification carries besides `call_id` (which every one has).
/// A contract for relays and template authors: names are only ever added, never renamed
/// (docs/notifications.md lists their meaning).
pub const VARS: [(&str, &[&str]); 6] = [
    ("call.accepted", &["pickup_code"]),
    (
        "call.assigned",
        &[
            "courier_id",
            "courier_name",
            "courier_tel",
            "vehicle",
            "vehicle_name",
            "distance_m",
            "eta_s",
            "eta_min",
        ],
    ),
    ("call.picked_up", &["courier_id", "courier_name"]),
    ("call.completed", &["courier_id", "courier_name"]),
    ("call.cancelled", &["by", "reason"]),
    ("call.failed", &["reason"]),
];

/// Which language the default texts are in, and per-key overrides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Templates {
    /// `ko` or `en`: the defaults used for keys without an override.
    pub lang: String,
    /// Key → template text with `{var}` placeholders.
    pub text: BTreeMap<String, String>,
}

impl Default for Templates {
    fn default() -> Self {
        Self {
            lang: "ko".into(),
            text: BTreeMap::new(),
        }
    }
}

fn default_text(lang: &str, key: &str) -> &'static str {
    match (lang, key) {
        ("en", "call.accepted") => {
            "Your pickup request {call_id} was accepted. Pickup code: {pickup_code}."
        }
        ("en", "call.assigned") => {
            "Courier {courier_name} ({vehicle_name}, {courier_tel}) is on the way, about {eta_min} min."
        }
        ("en", "call.picked_up") => "Your parcel was picked up by {courier_name}.",
        ("en", "call.completed") => "Your parcel was delivered by {courier_name}.",
        ("en", "call.cancelled") => "Your pickup request {call_id} was cancelled ({reason}).",
        ("en", "call.failed") => "Sorry, no courier was available for {call_id}. Please try again.",
        (_, "call.accepted") => {
            "픽업 요청 {call_id}이(가) 접수되었습니다. 픽업 코드: {pickup_code}"
        }
        (_, "call.assigned") => {
            "배송기사 {courier_name}({vehicle_name}, {courier_tel})님이 약 {eta_min}분 후 도착합니다."
        }
        (_, "call.picked_up") => "{courier_name}님이 물품을 픽업했습니다.",
        (_, "call.completed") => "{courier_name}님이 물품 배송을 완료했습니다.",
        (_, "call.cancelled") => "픽업 요청 {call_id}이(가) 취소되었습니다 ({reason}).",
        (_, "call.failed") => {
            "죄송합니다. {call_id} 요청에 배정 가능한 기사가 없습니다. 다시 시도해 주세요."
        }
        _ => "{call_id}",
    }
}

impl Templates {
    /// The vehicle's name in the template language (the `vehicle_name` variable).
    pub fn vehicle_name(&self, v: Vehicle) -> &'static str {
        match (self.lang.as_str(), v) {
            ("en", v) => v.as_str(),
            (_, Vehicle::Bicycle) => "자전거",
            (_, Vehicle::Scooter) => "오토바이",
            (_, Vehicle::Car) => "승용차",
            (_, Vehicle::Van) => "밴",
            (_, Vehicle::Truck) => "트럭",
        }
    }

    /// Checks that overrides use known keys and the language is supported.
    pub fn validate(&self) -> Result<(), String> {
        if self.lang != "ko" && self.lang != "en" {
            return Err(format!(
                "notifications.templates.lang: {:?} is not supported (use \"ko\" or \"en\")",
                self.lang
            ));
        }
        for k in self.text.keys() {
            if !KEYS.contains(&k.as_str()) {
                return Err(format!(
                    "notifications.templates.text.{k}: unknown template key (known: {})",
                    KEYS.join(", ")
                ));
            }
        }
        Ok(())
    }

    /// Renders `key` with `vars`; unknown placeholders stay as they are.
    pub fn render(&self, key: &str, vars: &serde_json::Map<String, serde_json::Value>) -> String {
        let tpl = self
            .text
            .get(key)
            .map(String::as_str)
            .unwrap_or_else(|| default_text(&self.lang, key));
        let mut out = String::with_capacity(tpl.len() + 32);
        let mut rest = tpl;
        while let Some(start) = rest.find('{') {
            out.push_str(&rest[..start]);
            let after = &rest[start + 1..];
            match after.find('}') {
                Some(end) => {
                    let name = &after[..end];
                    match vars.get(name) {
                        Some(serde_json::Value::String(s)) => out.push_str(s),
                        Some(v) => out.push_str(&v.to_string()),
                        None => {
                            out.push('{');
                            out.push_str(name);
                            out.push('}');
                        }
                    }
                    rest = &after[end + 1..];
                }
                None => {
                    out.push_str(&rest[start..]);
                    rest = "";
                }
            }
        }
        out.push_str(rest);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_vars_and_keeps_unknown() {
        let mut t = Templates::default();
        t.text
            .insert("call.failed".into(), "no {x} for {call_id} {y".into());
        let mut vars = serde_json::Map::new();
        vars.insert("call_id".into(), "c1".into());
        vars.insert("x".into(), 3.into());
        assert_eq!(t.render("call.failed", &vars), "no 3 for c1 {y");
        assert!(t.render("call.completed", &vars).contains("배송"));
        t.lang = "en".into();
        assert!(t.render("call.completed", &vars).contains("delivered"));
        assert_eq!(t.vehicle_name(Vehicle::Van), "van");
        t.text.insert("nope".into(), String::new());
        assert!(t.validate().unwrap_err().contains("nope"));
    }

    /// Every default text of both languages is specific to its key and uses only the
    /// documented variables, so nothing renders with a `{placeholder}` left in it.
    #[test]
    fn defaults_use_only_documented_vars() {
        for lang in ["ko", "en"] {
            let t = Templates {
                lang: lang.into(),
                ..Templates::default()
            };
            for (key, names) in VARS {
                assert!(KEYS.contains(&key));
                let mut vars = serde_json::Map::new();
                vars.insert("call_id".into(), "c1".into());
                for n in names {
                    vars.insert((*n).into(), "x".into());
                }
                let text = t.render(key, &vars);
                assert!(!text.contains('{'), "{lang} {key}: {text}");
                assert_ne!(text, "c1", "{lang} {key} has no default text");
            }
        }
        assert_eq!(VARS.len(), KEYS.len());
    }
}
