//! Topic names of contract v1. Every topic lives under `pickup/v1/<site>/` so that many
//! sites can share one broker and one ACL pattern per role.

use thiserror::Error;

use crate::validate::is_valid_id;

/// Why a topic or site name was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TopicError {
    /// The site name is empty, too long, or holds characters other than `[A-Za-z0-9_.-]`.
    #[error("site name {0:?} must be 1-64 characters of A-Z a-z 0-9 _ . -")]
    BadSite(String),
    /// The topic is not under this site's prefix or not one the daemon listens to.
    #[error("topic {0:?} is not part of the pickupd contract")]
    Unknown(String),
    /// The topic has the right shape but an id segment is not a valid id.
    #[error("topic {0:?} carries an invalid id")]
    BadId(String),
}

/// A request or report topic the daemon subscribes to, with the id it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbound<'a> {
    /// `calls/create`
    CreateCall,
    /// `calls/<id>/cancel`
    CancelCall(&'a str),
    /// `calls/<id>/get`
    GetCall(&'a str),
    /// `couriers/<cid>/presence`
    Presence(&'a str),
    /// `couriers/<cid>/location`
    Location(&'a str),
    /// `couriers/<cid>/job/reply`
    JobReply(&'a str),
}

/// Who a reply topic belongs to (`<prefix>/<kind>/<id>/replies`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyOwner<'a> {
    /// A kiosk's own response topic.
    Kiosk(&'a str),
    /// An operator tool such as `pickupctl`.
    Client(&'a str),
    /// A courier handheld.
    Courier(&'a str),
}

/// Topic builder and parser for one site. Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    /// Topics for `site`; refuses names that would break the topic structure.
    pub fn new(site: &str) -> Result<Self, TopicError> {
        if !is_valid_id(site) {
            return Err(TopicError::BadSite(site.to_string()));
        }
        Ok(Self {
            prefix: format!("pickup/v1/{site}"),
        })
    }

    /// `pickup/v1/<site>`
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn t(&self, rest: &str) -> String {
        format!("{}/{}", self.prefix, rest)
    }

    /// Where kiosks publish new calls.
    pub fn calls_create(&self) -> String {
        self.t("calls/create")
    }
    /// Cancel request for one call.
    pub fn call_cancel(&self, call_id: &str) -> String {
        self.t(&format!("calls/{call_id}/cancel"))
    }
    /// Status request for one call.
    pub fn call_get(&self, call_id: &str) -> String {
        self.t(&format!("calls/{call_id}/get"))
    }
    /// Retained call view.
    pub fn call_state(&self, call_id: &str) -> String {
        self.t(&format!("calls/{call_id}/state"))
    }
    /// Filter matching every retained call view.
    pub fn call_state_filter(&self) -> String {
        self.t("calls/+/state")
    }
    /// Retained online/offline of a courier (its last will sets offline).
    pub fn courier_presence(&self, cid: &str) -> String {
        self.t(&format!("couriers/{cid}/presence"))
    }
    /// Location reports of a courier.
    pub fn courier_location(&self, cid: &str) -> String {
        self.t(&format!("couriers/{cid}/location"))
    }
    /// Retained current job of a courier.
    pub fn courier_job(&self, cid: &str) -> String {
        self.t(&format!("couriers/{cid}/job"))
    }
    /// A courier's answers about its job.
    pub fn courier_job_reply(&self, cid: &str) -> String {
        self.t(&format!("couriers/{cid}/job/reply"))
    }
    /// Customer notifications for the relay.
    pub fn notifications(&self) -> String {
        self.t("notifications")
    }
    /// Retained latest reading of a scale.
    pub fn scale_weight(&self, sid: &str) -> String {
        self.t(&format!("scales/{sid}/weight"))
    }
    /// Retained daemon state (ready / stopping / lost).
    pub fn daemon_state(&self) -> String {
        self.t("daemon/state")
    }
    /// The stable response topic of a kiosk.
    pub fn kiosk_replies(&self, kid: &str) -> String {
        self.t(&format!("kiosks/{kid}/replies"))
    }
    /// The stable response topic of an operator tool.
    pub fn client_replies(&self, client_id: &str) -> String {
        self.t(&format!("clients/{client_id}/replies"))
    }
    /// The response topic of a courier handheld (answers to its job replies).
    pub fn courier_replies(&self, cid: &str) -> String {
        self.t(&format!("couriers/{cid}/replies"))
    }

    /// What the daemon's status-read connection subscribes to.
    pub fn call_gets(&self) -> String {
        self.t("calls/+/get")
    }

    /// The filters the daemon subscribes to (on one connection; with a separate
    /// status-read connection, all but [`Topics::call_gets`]).
    pub fn daemon_subscriptions(&self) -> Vec<String> {
        vec![
            self.calls_create(),
            self.t("calls/+/cancel"),
            self.t("calls/+/get"),
            self.t("couriers/+/presence"),
            self.t("couriers/+/location"),
            self.t("couriers/+/job/reply"),
        ]
    }

    fn strip<'a>(&self, topic: &'a str) -> Option<&'a str> {
        topic.strip_prefix(self.prefix.as_str())?.strip_prefix('/')
    }

    /// Classifies a topic the daemon received.
    pub fn parse<'a>(&self, topic: &'a str) -> Result<Inbound<'a>, TopicError> {
        let unknown = || TopicError::Unknown(truncate(topic));
        let rest = self.strip(topic).ok_or_else(unknown)?;
        let parts: Vec<&str> = rest.split('/').collect();
        let inbound = match parts.as_slice() {
            ["calls", "create"] => return Ok(Inbound::CreateCall),
            ["calls", id, "cancel"] => Inbound::CancelCall(id),
            ["calls", id, "get"] => Inbound::GetCall(id),
            ["couriers", id, "presence"] => Inbound::Presence(id),
            ["couriers", id, "location"] => Inbound::Location(id),
            ["couriers", id, "job", "reply"] => Inbound::JobReply(id),
            _ => return Err(unknown()),
        };
        let id = match inbound {
            Inbound::CancelCall(id)
            | Inbound::GetCall(id)
            | Inbound::Presence(id)
            | Inbound::Location(id)
            | Inbound::JobReply(id) => id,
            Inbound::CreateCall => "",
        };
        if !is_valid_id(id) {
            return Err(TopicError::BadId(truncate(topic)));
        }
        Ok(inbound)
    }

    /// Checks that `topic` is an acceptable response topic (`<prefix>/{kiosks,clients,couriers}/<id>/replies`),
    /// so that a request cannot make the daemon publish onto state or job topics.
    pub fn parse_reply_topic<'a>(&self, topic: &'a str) -> Result<ReplyOwner<'a>, TopicError> {
        let unknown = || TopicError::Unknown(truncate(topic));
        let rest = self.strip(topic).ok_or_else(unknown)?;
        let parts: Vec<&str> = rest.split('/').collect();
        let owner = match parts.as_slice() {
            ["kiosks", id, "replies"] => ReplyOwner::Kiosk(id),
            ["clients", id, "replies"] => ReplyOwner::Client(id),
            ["couriers", id, "replies"] => ReplyOwner::Courier(id),
            _ => return Err(unknown()),
        };
        let (ReplyOwner::Kiosk(id) | ReplyOwner::Client(id) | ReplyOwner::Courier(id)) = owner;
        if !is_valid_id(id) {
            return Err(TopicError::BadId(truncate(topic)));
        }
        Ok(owner)
    }
}

/// Topics echoed in errors are cut short: they came from outside.
fn truncate(s: &str) -> String {
    s.chars().take(128).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_and_parses_every_inbound_topic() {
        let t = Topics::new("seoul-1").unwrap();
        assert_eq!(t.calls_create(), "pickup/v1/seoul-1/calls/create");
        assert_eq!(t.parse(&t.calls_create()), Ok(Inbound::CreateCall));
        assert_eq!(
            t.parse(&t.call_cancel("abc")),
            Ok(Inbound::CancelCall("abc"))
        );
        assert_eq!(t.parse(&t.call_get("abc")), Ok(Inbound::GetCall("abc")));
        assert_eq!(
            t.parse(&t.courier_presence("k1")),
            Ok(Inbound::Presence("k1"))
        );
        assert_eq!(
            t.parse(&t.courier_location("k1")),
            Ok(Inbound::Location("k1"))
        );
        assert_eq!(
            t.parse(&t.courier_job_reply("k1")),
            Ok(Inbound::JobReply("k1"))
        );
    }

    #[test]
    fn refuses_foreign_and_malformed_topics() {
        let t = Topics::new("s").unwrap();
        for bad in [
            "",
            "pickup/v1/other/calls/create",
            "pickup/v1/s",
            "pickup/v1/s/",
            "pickup/v1/s/calls",
            "pickup/v1/s/calls/x/y/cancel",
            "pickup/v1/s/couriers/k1/job",
            "pickup/v1/s/calls//get",
        ] {
            assert!(t.parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(matches!(
            t.parse("pickup/v1/s/calls/a b/get"),
            Err(TopicError::BadId(_))
        ));
    }

    #[test]
    fn reply_topics_are_confined() {
        let t = Topics::new("s").unwrap();
        assert_eq!(
            t.parse_reply_topic(&t.kiosk_replies("k1")),
            Ok(ReplyOwner::Kiosk("k1"))
        );
        assert!(t.parse_reply_topic(&t.courier_job("k1")).is_err());
        assert!(t.parse_reply_topic(&t.call_state("c1")).is_err());
        assert!(t.parse_reply_topic("pickup/v1/s/kiosks/+/replies").is_err());
        assert!(t.parse_reply_topic("elsewhere/kiosks/k1/replies").is_err());
    }

    #[test]
    fn site_names_are_checked() {
        assert!(Topics::new("").is_err());
        assert!(Topics::new("a/b").is_err());
        assert!(Topics::new("a+").is_err());
        assert!(Topics::new("site_1.a-b").is_ok());
    }
}
