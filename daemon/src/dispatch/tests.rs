//! Table tests of the saga with a hand-turned clock.

use pickup_protocol::{
    CallStatus, CourierLocation, CreateCall, ErrorCode, JobAction, JobKind, JobReply, Location,
    Parcel, ParcelClass, Presence, PresenceState, Topics, Vehicle,
};

use super::*;

const T0: i64 = 1_700_000_000_000;

fn cfg(mode: Mode) -> DispatchConfig {
    DispatchConfig {
        mode,
        radius_m: 3_000.0,
        deadline_ms: 60_000,
        offer_timeout_ms: 10_000,
        grace_ms: 20_000,
        ..DispatchConfig::default()
    }
}

fn disp(mode: Mode) -> Dispatcher {
    Dispatcher::new(cfg(mode), Topics::new("t").unwrap())
}

fn online(d: &mut Dispatcher, id: &str, vehicle: Vehicle, lat: f64, lon: f64, now: i64) {
    d.presence(
        id,
        Presence {
            state: PresenceState::Online,
            available: true,
            name: Some(format!("name-{id}")),
            vehicle: Some(vehicle),
            tel: Some("010-9999-0000".into()),
            at: None,
        },
        now,
    );
    d.location(
        id,
        CourierLocation {
            lat,
            lon,
            at: Some(now),
        },
        now,
    );
}

fn offline(d: &mut Dispatcher, id: &str, now: i64) -> Decision {
    d.presence(
        id,
        Presence {
            state: PresenceState::Offline,
            available: true,
            name: None,
            vehicle: None,
            tel: None,
            at: None,
        },
        now,
    )
}

fn new_call(id: &str, class: ParcelClass) -> NewCall {
    NewCall {
        id: id.into(),
        pickup_code: "4321".into(),
        req: CreateCall {
            request_id: format!("req-{id}"),
            tel: "010-1234-5678".into(),
            location: Location {
                lat: 37.5,
                lon: 127.0,
                label: None,
            },
            parcel: Parcel {
                class,
                weight_kg: None,
                weight_source: None,
            },
            kiosk_id: Some("k1".into()),
            scale_id: None,
            destination: None,
        },
        price: None,
        class_corrected: None,
        correlation: None,
    }
}

/// Creates a call and runs the assigner, as the loop does.
fn create(d: &mut Dispatcher, id: &str, class: ParcelClass, now: i64) -> Decision {
    let mut dec = d.create_call(new_call(id, class), now);
    dec.absorb(d.assign_pending(now));
    dec
}

fn status(d: &Dispatcher, id: &str) -> CallStatus {
    d.call(id).unwrap().status
}

fn holder(d: &Dispatcher, id: &str) -> Option<String> {
    d.call(id)
        .unwrap()
        .courier
        .as_ref()
        .map(|c| c.courier_id.clone())
}

fn reply(call: &str, action: JobAction) -> JobReply {
    JobReply {
        call_id: call.into(),
        action,
        reply_id: None,
        reason: None,
        pickup_code: None,
        at: None,
    }
}

fn err_code(dec: &Decision) -> Option<ErrorCode> {
    match &dec.reply {
        Some(ReplyBody::Error(e)) => Some(e.code),
        _ => None,
    }
}

fn jobs_to(dec: &Decision, courier: &str) -> Vec<JobKind> {
    dec.changes
        .iter()
        .filter_map(|c| match c {
            Change::Outbox(m) if m.topic == format!("pickup/v1/t/couriers/{courier}/job") => {
                serde_json::from_slice::<pickup_protocol::Job>(&m.payload)
                    .ok()
                    .map(|j| j.kind)
            }
            _ => None,
        })
        .collect()
}

#[test]
fn nearest_eligible_courier_is_assigned_and_told() {
    let mut d = disp(Mode::Auto);
    online(&mut d, "far", Vehicle::Car, 37.51, 127.0, T0);
    online(&mut d, "near", Vehicle::Car, 37.501, 127.0, T0);
    let dec = create(&mut d, "c1", ParcelClass::Light, T0);
    assert_eq!(status(&d, "c1"), CallStatus::Assigned);
    assert_eq!(holder(&d, "c1").as_deref(), Some("near"));
    assert_eq!(jobs_to(&dec, "near"), vec![JobKind::Assigned]);
    // The answer is the state at acceptance, and carries the pickup code.
    match dec.reply {
        Some(ReplyBody::Create(a)) => {
            assert_eq!(a.call.status, CallStatus::Requested);
            assert_eq!(a.pickup_code, "4321");
            assert!(!a.duplicate);
        }
        other => panic!("{other:?}"),
    }
    // The call (which carries its request id) and the assignment are written in the same
    // decision, and the retained state never holds the pickup code or the full phone
    // number.
    assert!(dec
        .changes
        .iter()
        .any(|c| matches!(c, Change::Call(call) if call.request_id == "req-c1")));
    for c in &dec.changes {
        if let Change::Outbox(m) = c {
            if m.retain {
                let s = String::from_utf8_lossy(&m.payload);
                assert!(!s.contains("4321"), "pickup code on {}", m.topic);
                assert!(!s.contains("1234-5678"), "phone on {}", m.topic);
            }
        }
    }
}

#[test]
fn ties_go_to_the_longest_idle() {
    let mut d = disp(Mode::Auto);
    online(&mut d, "b", Vehicle::Car, 37.501, 127.0, T0 + 10);
    online(&mut d, "a", Vehicle::Car, 37.501, 127.0, T0 + 20);
    create(&mut d, "c1", ParcelClass::Light, T0 + 30);
    assert_eq!(holder(&d, "c1").as_deref(), Some("b"));
}

#[test]
fn heavy_parcel_skips_scooter_and_radius_is_kept() {
    let mut d = disp(Mode::Auto);
    online(&mut d, "scooter", Vehicle::Scooter, 37.5001, 127.0, T0);
    online(&mut d, "far-truck", Vehicle::Truck, 37.6, 127.0, T0);
    create(&mut d, "c1", ParcelClass::Heavy, T0);
    assert_eq!(status(&d, "c1"), CallStatus::Dispatching);
    online(&mut d, "van", Vehicle::Van, 37.502, 127.0, T0 + 1);
    let dec = d.assign_pending(T0 + 1);
    assert_eq!(holder(&d, "c1").as_deref(), Some("van"));
    assert_eq!(jobs_to(&dec, "van"), vec![JobKind::Assigned]);
}

#[test]
fn no_courier_waits_then_later_courier_gets_it() {
    let mut d = disp(Mode::Auto);
    create(&mut d, "c1", ParcelClass::Light, T0);
    assert_eq!(status(&d, "c1"), CallStatus::Dispatching);
    assert!(d.next_wakeup().is_some_and(|w| w == T0 + 60_000));
    online(&mut d, "k1", Vehicle::Bicycle, 37.5, 127.001, T0 + 5_000);
    d.assign_pending(T0 + 5_000);
    assert_eq!(status(&d, "c1"), CallStatus::Assigned);
}

#[test]
fn deadline_fails_the_call_and_tells_the_customer() {
    let mut d = disp(Mode::Auto);
    create(&mut d, "c1", ParcelClass::Light, T0);
    let dec = d.tick(T0 + 59_999);
    assert_eq!(status(&d, "c1"), CallStatus::Dispatching);
    assert!(dec.changes.is_empty());
    let dec = d.tick(T0 + 60_000);
    assert_eq!(status(&d, "c1"), CallStatus::Failed);
    assert!(dec
        .changes
        .iter()
        .any(|c| matches!(c, Change::Outbox(m) if m.topic.ends_with("/notifications"))));
    // A courier arriving later does not revive it.
    online(&mut d, "k1", Vehicle::Car, 37.5, 127.0, T0 + 61_000);
    d.assign_pending(T0 + 61_000);
    assert_eq!(status(&d, "c1"), CallStatus::Failed);
    assert!(d.courier("k1").unwrap().is_free());
}

#[test]
fn cancel_at_each_stage() {
    // requested (not yet looked at by the assigner)
    let mut d = disp(Mode::Auto);
    d.create_call(new_call("c1", ParcelClass::Light), T0);
    let dec = d.cancel_call("c1", None, CancelledBy::Customer, None, T0 + 1);
    assert_eq!(status(&d, "c1"), CallStatus::Cancelled);
    assert!(matches!(dec.reply, Some(ReplyBody::Call(_))));
    // dispatching
    create(&mut d, "c2", ParcelClass::Light, T0);
    d.cancel_call(
        "c2",
        Some("changed my mind".into()),
        CancelledBy::Customer,
        None,
        T0 + 1,
    );
    assert_eq!(
        d.call("c2").unwrap().reason.as_deref(),
        Some("changed my mind")
    );
    d.assign_pending(T0 + 2);
    assert_eq!(d.pending_count(), 0);
    // assigned: the courier is freed and told, and gets the next call
    online(&mut d, "k1", Vehicle::Car, 37.5, 127.0, T0);
    create(&mut d, "c3", ParcelClass::Light, T0 + 3);
    assert_eq!(holder(&d, "c3").as_deref(), Some("k1"));
    let dec = d.cancel_call("c3", None, CancelledBy::Customer, None, T0 + 4);
    assert_eq!(jobs_to(&dec, "k1"), vec![JobKind::Cancelled]);
    assert!(d.courier("k1").unwrap().is_free());
    create(&mut d, "c4", ParcelClass::Light, T0 + 5);
    assert_eq!(holder(&d, "c4").as_deref(), Some("k1"));
    // Cancelling twice is fine; after pickup it is refused.
    let again = d.cancel_call("c3", None, CancelledBy::Customer, None, T0 + 6);
    assert!(matches!(again.reply, Some(ReplyBody::Call(_))) && again.changes.is_empty());
    let mut r = reply("c4", JobAction::PickedUp);
    r.pickup_code = Some("4321".into());
    d.job_reply("k1", r, T0 + 7);
    let dec = d.cancel_call("c4", None, CancelledBy::Customer, None, T0 + 8);
    assert_eq!(err_code(&dec), Some(ErrorCode::InvalidState));
    assert!(dec.changes.is_empty());
    assert_eq!(
        err_code(&d.cancel_call("nope", None, CancelledBy::Customer, None, T0)),
        Some(ErrorCode::NotFound)
    );
}

#[test]
fn pickup_code_and_order_of_replies() {
    let mut d = disp(Mode::Auto);
    online(&mut d, "k1", Vehicle::Car, 37.5, 127.0, T0);
    online(&mut d, "k2", Vehicle::Car, 37.6, 127.0, T0);
    create(&mut d, "c1", ParcelClass::Light, T0);
    // completed before picked_up
    assert_eq!(
        err_code(&d.job_reply("k1", reply("c1", JobAction::Completed), T0 + 1)),
        Some(ErrorCode::InvalidState)
    );
    // not your job
    assert_eq!(
        err_code(&d.job_reply("k2", reply("c1", JobAction::PickedUp), T0 + 1)),
        Some(ErrorCode::Forbidden)
    );
    // wrong code, limited
    for _ in 0..5 {
        let mut r = reply("c1", JobAction::PickedUp);
        r.pickup_code = Some("0000".into());
        assert_eq!(
            err_code(&d.job_reply("k1", r, T0 + 2)),
            Some(ErrorCode::WrongCode)
        );
    }
    let mut r = reply("c1", JobAction::PickedUp);
    r.pickup_code = Some("4321".into());
    assert_eq!(
        err_code(&d.job_reply("k1", r, T0 + 3)),
        Some(ErrorCode::TooManyAttempts)
    );
    assert_eq!(status(&d, "c1"), CallStatus::Assigned);
}

/// A courier coming back online is told its current job again (assigned, then picked
/// up), whatever its broker re-sends on a resumed session; a free courier gets no job
/// message, and going offline tells nothing.
#[test]
fn a_courier_back_online_is_told_its_current_job_again() {
    let mut d = disp(Mode::Auto);
    let presence = |available: bool| Presence {
        state: PresenceState::Online,
        available,
        name: None,
        vehicle: None,
        tel: None,
        at: None,
    };
    online(&mut d, "k1", Vehicle::Car, 37.5, 127.0, T0);
    online(&mut d, "k2", Vehicle::Car, 37.6, 127.0, T0);
    create(&mut d, "c1", ParcelClass::Light, T0);
    assert_eq!(holder(&d, "c1").as_deref(), Some("k1"));
    assert!(jobs_to(&offline(&mut d, "k1", T0 + 100), "k1").is_empty());
    let back = d.presence("k1", presence(true), T0 + 200);
    assert_eq!(jobs_to(&back, "k1"), vec![JobKind::Assigned]);
    let mut r = reply("c1", JobAction::PickedUp);
    r.pickup_code = Some("4321".into());
    d.job_reply("k1", r, T0 + 300);
    offline(&mut d, "k1", T0 + 400);
    let back = d.presence("k1", presence(false), T0 + 500);
    assert_eq!(jobs_to(&back, "k1"), vec![JobKind::PickedUp]);
    assert_eq!(status(&d, "c1"), CallStatus::PickedUp);
    // k2 holds nothing: its presence publishes no job.
    assert!(jobs_to(&d.presence("k2", presence(true), T0 + 600), "k2").is_empty());
}

#[test]
fn right_code_then_completed_with_device_times_and_idempotent_replies() {
    let mut d = disp(Mode::Auto);
    online(&mut d, "k1", Vehicle::Car, 37.5, 127.0, T0);
    create(&mut d, "c1", ParcelClass::Light, T0);
    let mut r = reply("c1", JobAction::PickedUp);
    r.pickup_code = Some("4321".into());
    r.reply_id = Some("r1".into());
    r.at = Some(T0 + 500);
    let dec = d.job_reply("k1", r.clone(), T0 + 9_000);
    assert_eq!(status(&d, "c1"), CallStatus::PickedUp);
    // The device's time is recorded, not the arrival time.
    assert!(dec.changes.iter().any(|c| matches!(c, Change::Event(e) if e.kind == "picked_up" && e.at == T0 + 500 && e.recorded_at == T0 + 9_000)));
    // Same reply id again: nothing changes.
    let again = d.job_reply("k1", r, T0 + 9_500);
    assert!(again.changes.is_empty());
    assert!(matches!(again.reply, Some(ReplyBody::JobReply(ref a)) if a.duplicate));
    let dec = d.job_reply("k1", reply("c1", JobAction::Completed), T0 + 10_000);
    assert_eq!(status(&d, "c1"), CallStatus::Completed);
    assert_eq!(jobs_to(&dec, "k1"), vec![JobKind::None]);
    assert!(d.courier("k1").unwrap().is_free());
    // A repeat without reply id is recognised by state.
    let again = d.job_reply("k1", reply("c1", JobAction::Completed), T0 + 10_001);
    assert!(again.changes.is_empty());
    // Finished calls are forgotten after a while.
    d.tick(T0 + 10_000 + d.config().keep_terminal_ms);
    assert!(d.call("c1").is_none());
}

#[test]
fn offers_time_out_and_are_never_repeated_to_the_same_courier() {
    let mut d = disp(Mode::Offer);
    online(&mut d, "a", Vehicle::Car, 37.5001, 127.0, T0);
    online(&mut d, "b", Vehicle::Car, 37.502, 127.0, T0);
    let dec = create(&mut d, "c1", ParcelClass::Light, T0);
    assert_eq!(jobs_to(&dec, "a"), vec![JobKind::Offer]);
    assert_eq!(status(&d, "c1"), CallStatus::Dispatching);
    // Timeout → b.
    let dec = d.tick(T0 + 10_000);
    assert_eq!(jobs_to(&dec, "a"), vec![JobKind::Withdrawn]);
    assert_eq!(jobs_to(&dec, "b"), vec![JobKind::Offer]);
    // b declines → nobody left; a is not asked again.
    let mut r = reply("c1", JobAction::Decline);
    r.reason = Some("flat tyre".into());
    let dec = d.job_reply("b", r, T0 + 11_000);
    assert!(jobs_to(&dec, "a").is_empty());
    d.assign_pending(T0 + 11_000);
    assert!(d.call("c1").unwrap().offer.is_none());
    assert_eq!(status(&d, "c1"), CallStatus::Dispatching);
    // A new courier comes online → offered, accepts → assigned.
    online(&mut d, "c", Vehicle::Car, 37.503, 127.0, T0 + 12_000);
    let dec = d.assign_pending(T0 + 12_000);
    assert_eq!(jobs_to(&dec, "c"), vec![JobKind::Offer]);
    // Accepting someone else's offer is refused.
    assert_eq!(
        err_code(&d.job_reply("a", reply("c1", JobAction::Accept), T0 + 12_500)),
        Some(ErrorCode::InvalidState)
    );
    let dec = d.job_reply("c", reply("c1", JobAction::Accept), T0 + 13_000);
    assert_eq!(jobs_to(&dec, "c"), vec![JobKind::Assigned]);
    assert_eq!(status(&d, "c1"), CallStatus::Assigned);
}

#[test]
fn offline_courier_loses_offer_at_once_and_job_after_grace() {
    let mut d = disp(Mode::Offer);
    online(&mut d, "a", Vehicle::Car, 37.5001, 127.0, T0);
    online(&mut d, "b", Vehicle::Car, 37.502, 127.0, T0);
    create(&mut d, "c1", ParcelClass::Light, T0);
    let dec = offline(&mut d, "a", T0 + 1_000);
    assert_eq!(jobs_to(&dec, "a"), vec![JobKind::Withdrawn]);
    let dec = d.assign_pending(T0 + 1_000);
    assert_eq!(jobs_to(&dec, "b"), vec![JobKind::Offer]);
    d.job_reply("b", reply("c1", JobAction::Accept), T0 + 2_000);
    assert_eq!(holder(&d, "c1").as_deref(), Some("b"));
    // b drops off: grace period, then reassignment to a (back online) and both told.
    offline(&mut d, "b", T0 + 3_000);
    assert_eq!(d.call("c1").unwrap().grace_until, Some(T0 + 23_000));
    online(&mut d, "a", Vehicle::Car, 37.5001, 127.0, T0 + 4_000);
    let dec = d.tick(T0 + 22_999);
    assert!(jobs_to(&dec, "b").is_empty());
    let dec = d.tick(T0 + 23_000);
    assert_eq!(jobs_to(&dec, "b"), vec![JobKind::Withdrawn]);
    assert_eq!(jobs_to(&dec, "a"), vec![JobKind::Offer]);
    // A courier who comes back within the grace period keeps the job.
    let mut d = disp(Mode::Auto);
    online(&mut d, "a", Vehicle::Car, 37.5001, 127.0, T0);
    create(&mut d, "c1", ParcelClass::Light, T0);
    offline(&mut d, "a", T0 + 1);
    online(&mut d, "a", Vehicle::Car, 37.5001, 127.0, T0 + 2);
    d.tick(T0 + 100_000);
    assert_eq!(holder(&d, "c1").as_deref(), Some("a"));
}

#[test]
fn duplicate_request_id_returns_the_same_call() {
    let mut d = disp(Mode::Auto);
    create(&mut d, "c1", ParcelClass::Light, T0);
    let mut again = new_call("other-id", ParcelClass::Light);
    again.req.request_id = "req-c1".into();
    let dec = d.create_call(again, T0 + 1);
    assert!(dec.changes.is_empty());
    match dec.reply {
        Some(ReplyBody::Create(a)) => {
            assert!(a.duplicate);
            assert_eq!(a.call.call_id, "c1");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn timers_keep_stored_times_across_restore() {
    let mut d = disp(Mode::Offer);
    online(&mut d, "a", Vehicle::Car, 37.5001, 127.0, T0);
    create(&mut d, "c1", ParcelClass::Light, T0);
    let call = d.call("c1").unwrap().clone();
    let courier = d.courier("a").unwrap().clone();
    // "Restart" 4 s later: the offer still lapses at T0 + 10 s, not 10 s after restore.
    let mut d2 = disp(Mode::Offer);
    d2.restore(vec![call], vec![courier]);
    assert_eq!(d2.next_wakeup(), Some(T0 + 10_000));
    let dec = d2.tick(T0 + 4_000);
    assert!(jobs_to(&dec, "a").is_empty());
    let dec = d2.tick(T0 + 10_000);
    assert_eq!(jobs_to(&dec, "a"), vec![JobKind::Withdrawn]);
}

#[test]
fn stale_location_is_not_eligible() {
    let mut d = disp(Mode::Auto);
    online(&mut d, "a", Vehicle::Car, 37.5001, 127.0, T0);
    let later = T0 + d.config().location_max_age_ms + 1;
    create(&mut d, "c1", ParcelClass::Light, later);
    assert_eq!(status(&d, "c1"), CallStatus::Dispatching);
}

/// Notifications in a decision, parsed, each with whether a webhook delivery carries the
/// same bytes.
fn notifications(dec: &Decision) -> Vec<(pickup_protocol::Notification, bool)> {
    dec.changes
        .iter()
        .filter_map(|c| match c {
            Change::Outbox(m) if m.topic.ends_with("/notifications") => {
                let n: pickup_protocol::Notification = serde_json::from_slice(&m.payload).unwrap();
                let queued = dec.changes.iter().any(|c| {
                    matches!(c, Change::Delivery(dl) if dl.payload == m.payload && dl.id == n.id
                        && dl.call_id == n.call_id && dl.sink == super::saga::WEBHOOK_SINK)
                });
                Some((n, queued))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn every_customer_event_notifies_with_the_documented_vars_in_order() {
    let mut d = Dispatcher::new(
        DispatchConfig {
            webhook: true,
            ..cfg(Mode::Auto)
        },
        Topics::new("t").unwrap(),
    );
    let mut all = Vec::new();
    online(&mut d, "k1", Vehicle::Scooter, 37.501, 127.0, T0);
    all.extend(notifications(&create(&mut d, "c1", ParcelClass::Light, T0)));
    // c2 waits (the only courier is busy) and is cancelled; c3 waits until its deadline.
    all.extend(notifications(&create(
        &mut d,
        "c2",
        ParcelClass::Light,
        T0 + 1,
    )));
    all.extend(notifications(&d.cancel_call(
        "c2",
        None,
        CancelledBy::Customer,
        None,
        T0 + 2,
    )));
    all.extend(notifications(&create(
        &mut d,
        "c3",
        ParcelClass::Heavy,
        T0 + 3,
    )));
    let mut r = reply("c1", JobAction::PickedUp);
    r.pickup_code = Some("4321".into());
    all.extend(notifications(&d.job_reply("k1", r, T0 + 4)));
    all.extend(notifications(&d.job_reply(
        "k1",
        reply("c1", JobAction::Completed),
        T0 + 5,
    )));
    all.extend(notifications(&d.tick(T0 + 3 + 60_000)));

    let got: Vec<(String, String)> = all
        .iter()
        .map(|(n, _)| (n.id.clone(), n.template.clone()))
        .collect();
    let want = [
        ("c1-1", "call.accepted"),
        ("c1-2", "call.assigned"),
        ("c2-1", "call.accepted"),
        ("c2-2", "call.cancelled"),
        ("c3-1", "call.accepted"),
        ("c1-3", "call.picked_up"),
        ("c1-4", "call.completed"),
        ("c3-2", "call.failed"),
    ];
    assert_eq!(
        got,
        want.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect::<Vec<_>>()
    );
    for (n, queued) in &all {
        assert!(queued, "{} has no webhook delivery", n.id);
        assert_eq!(n.tel, "010-1234-5678", "full number on the relay channel");
        assert!(!n.text.contains('{'), "{}: {}", n.id, n.text);
        let (_, names) = super::notice::VARS
            .iter()
            .find(|(k, _)| *k == n.template)
            .unwrap();
        let mut want: Vec<&str> = names.to_vec();
        want.push("call_id");
        want.sort_unstable();
        let mut have: Vec<&str> = n.vars.keys().map(String::as_str).collect();
        have.sort_unstable();
        assert_eq!(have, want, "{} vars", n.id);
    }
    let assigned = &all[1].0;
    assert_eq!(assigned.vars["courier_tel"], "010-****-0000");
    assert_eq!(assigned.vars["vehicle"], "scooter");
    assert_eq!(assigned.vars["vehicle_name"], "오토바이");
    assert!(assigned.vars["eta_min"].as_u64().unwrap() >= 1);
    assert_eq!(all[3].0.vars["by"], "customer");
    assert_eq!(all[0].0.vars["pickup_code"], "4321");

    // Without the webhook only the MQTT outbox row is written.
    let mut d = disp(Mode::Auto);
    let dec = create(&mut d, "c9", ParcelClass::Light, T0);
    let n = notifications(&dec);
    assert_eq!(n.len(), 1);
    assert!(!n[0].1);
    // And a reload does not switch the webhook on behind the sink's back.
    d.set_config(DispatchConfig {
        webhook: true,
        ..cfg(Mode::Auto)
    });
    assert!(!d.config().webhook);
}

#[test]
fn counters_follow_presence_and_pending_calls() {
    let mut d = disp(Mode::Auto);
    online(&mut d, "a", Vehicle::Car, 37.5001, 127.0, T0);
    online(&mut d, "a", Vehicle::Car, 37.5001, 127.0, T0 + 1);
    online(&mut d, "b", Vehicle::Car, 38.5, 127.0, T0 + 2);
    assert_eq!(d.online_count(), 2);
    offline(&mut d, "b", T0 + 3);
    offline(&mut d, "b", T0 + 4);
    assert_eq!(d.online_count(), 1);
    // c1 goes to a; c2 and c3 wait; cancelling c2 leaves one waiting.
    create(&mut d, "c1", ParcelClass::Light, T0 + 5);
    create(&mut d, "c2", ParcelClass::Light, T0 + 6);
    create(&mut d, "c3", ParcelClass::Light, T0 + 7);
    assert_eq!(d.pending_count(), 2);
    d.cancel_call("c2", None, CancelledBy::Customer, None, T0 + 8);
    assert_eq!(d.pending_count(), 1);
    assert!(!d.wants_assign());
    // Restored state counts the same.
    let mut d2 = disp(Mode::Auto);
    d2.restore(
        d.calls().cloned().collect(),
        d.couriers().cloned().collect(),
    );
    assert_eq!(d2.online_count(), 1);
    assert_eq!(d2.pending_count(), 1);
    // Open calls per kiosk: c1 (assigned) and c3 (dispatching); c2 is cancelled.
    assert_eq!(d.open_for_kiosk("k1"), 2);
    assert_eq!(d2.open_for_kiosk("k1"), 2);
    assert_eq!(d.open_for_kiosk("k2"), 0);
    d.cancel_call("c3", None, CancelledBy::Customer, None, T0 + 9);
    let mut r = reply("c1", JobAction::PickedUp);
    r.pickup_code = Some("4321".into());
    d.job_reply("a", r, T0 + 10);
    assert_eq!(d.open_for_kiosk("k1"), 1, "picked up is still open");
    d.job_reply("a", reply("c1", JobAction::Completed), T0 + 11);
    assert_eq!(d.open_for_kiosk("k1"), 0);
    // Finished calls forgotten from memory do not count again.
    d.tick(T0 + 10_000_000);
    assert_eq!(d.open_for_kiosk("k1"), 0);
}

/// Random sequences of inputs, applied to the dispatcher and to a reference that rebuilds
/// its timers and searches every pending call again before each assign pass (as after a
/// restart): decisions must be the same, and the next wake-up must be the earliest due
/// time over every call in memory.
mod equivalence {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Step {
        Online { c: u8, heavy: bool, dx: i8, dy: i8 },
        Offline { c: u8 },
        Move { c: u8, dx: i8, dy: i8 },
        Create { heavy: bool, dx: i8, dy: i8 },
        Cancel { k: u8 },
        Reply { k: u8, action: u8, stranger: bool },
        Advance { s: u16 },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u8..6, any::<bool>(), -12i8..12, -12i8..12)
                .prop_map(|(c, heavy, dx, dy)| Step::Online { c, heavy, dx, dy }),
            (0u8..6).prop_map(|c| Step::Offline { c }),
            (0u8..6, -12i8..12, -12i8..12).prop_map(|(c, dx, dy)| Step::Move { c, dx, dy }),
            (any::<bool>(), -12i8..12, -12i8..12).prop_map(|(heavy, dx, dy)| Step::Create {
                heavy,
                dx,
                dy
            }),
            (0u8..16).prop_map(|k| Step::Cancel { k }),
            (0u8..16, 0u8..4, any::<bool>()).prop_map(|(k, action, stranger)| Step::Reply {
                k,
                action,
                stranger
            }),
            (0u16..90).prop_map(|s| Step::Advance { s }),
        ]
    }

    fn config(mode: Mode) -> DispatchConfig {
        DispatchConfig {
            mode,
            radius_m: 3_000.0,
            deadline_ms: 60_000,
            offer_timeout_ms: 10_000,
            grace_ms: 20_000,
            keep_terminal_ms: 120_000,
            location_max_age_ms: 100_000,
            ..DispatchConfig::default()
        }
    }

    /// The earliest due time over every call, computed the long way.
    fn brute_wakeup(d: &Dispatcher) -> Option<i64> {
        let keep = d.config().keep_terminal_ms;
        d.calls()
            .filter_map(|c| {
                if let Some(o) = &c.offer {
                    return Some(o.expires_at);
                }
                match c.status {
                    CallStatus::Requested | CallStatus::Dispatching => Some(c.deadline_at),
                    CallStatus::Assigned => c.grace_until,
                    s if s.is_terminal() => Some(c.updated_at + keep),
                    _ => None,
                }
            })
            .min()
    }

    fn apply(d: &mut Dispatcher, s: &Step, now: i64, created: &[String]) -> Decision {
        let pos = |dx: i8, dy: i8| (37.5 + f64::from(dx) * 0.002, 127.0 + f64::from(dy) * 0.002);
        let call = |k: u8| created.get(usize::from(k) % created.len().max(1)).cloned();
        match s {
            Step::Online { c, heavy, dx, dy } => {
                let (lat, lon) = pos(*dx, *dy);
                let v = if *heavy {
                    Vehicle::Van
                } else {
                    Vehicle::Scooter
                };
                let mut dec = d.presence(
                    &format!("k{c}"),
                    Presence {
                        state: PresenceState::Online,
                        available: true,
                        name: None,
                        vehicle: Some(v),
                        tel: None,
                        at: None,
                    },
                    now,
                );
                dec.absorb(d.location(
                    &format!("k{c}"),
                    CourierLocation {
                        lat,
                        lon,
                        at: Some(now),
                    },
                    now,
                ));
                dec
            }
            Step::Offline { c } => offline(d, &format!("k{c}"), now),
            Step::Move { c, dx, dy } => {
                let (lat, lon) = pos(*dx, *dy);
                d.location(
                    &format!("k{c}"),
                    CourierLocation {
                        lat,
                        lon,
                        at: Some(now),
                    },
                    now,
                )
            }
            Step::Create { heavy, dx, dy } => {
                let id = format!("c{}", created.len());
                let mut n = new_call(
                    &id,
                    if *heavy {
                        ParcelClass::Heavy
                    } else {
                        ParcelClass::Light
                    },
                );
                let (lat, lon) = pos(*dx, *dy);
                n.req.location.lat = lat;
                n.req.location.lon = lon;
                d.create_call(n, now)
            }
            Step::Cancel { k } => match call(*k) {
                Some(id) => d.cancel_call(&id, None, CancelledBy::Customer, None, now),
                None => Decision::default(),
            },
            Step::Reply {
                k,
                action,
                stranger,
            } => {
                let Some(id) = call(*k) else {
                    return Decision::default();
                };
                let Some(c) = d.call(&id) else {
                    return Decision::default();
                };
                let holder = c
                    .courier
                    .as_ref()
                    .map(|b| b.courier_id.clone())
                    .or_else(|| c.offer.as_ref().map(|o| o.courier_id.clone()));
                let cid = match (holder, stranger) {
                    (Some(h), false) => h,
                    _ => "k0".to_string(),
                };
                let action = [
                    JobAction::Accept,
                    JobAction::Decline,
                    JobAction::PickedUp,
                    JobAction::Completed,
                ][usize::from(*action)];
                let mut r = reply(&id, action);
                r.pickup_code = Some("4321".into());
                d.job_reply(&cid, r, now)
            }
            Step::Advance { .. } => d.tick(now),
        }
    }

    fn run(mode: Mode, steps: &[Step]) -> Result<(), TestCaseError> {
        let topics = Topics::new("t").unwrap();
        let mut a = Dispatcher::new(config(mode), topics.clone());
        let mut b = Dispatcher::new(config(mode), topics);
        let mut now = T0;
        let mut created = Vec::new();
        for s in steps {
            if let Step::Advance { s } = s {
                now += i64::from(*s) * 1_000;
            }
            now += 1;
            let da = apply(&mut a, s, now, &created);
            b.set_config(config(mode));
            let db = apply(&mut b, s, now, &created);
            prop_assert_eq!(&da, &db, "decision for {:?}", s);
            if let Step::Create { .. } = s {
                created.push(format!("c{}", created.len()));
            }
            let da = a.assign_pending(now);
            b.set_config(config(mode));
            let db = b.assign_pending(now);
            prop_assert_eq!(&da, &db, "assign pass after {:?}", s);
            prop_assert_eq!(a.next_wakeup(), brute_wakeup(&a), "wake-up after {:?}", s);
            prop_assert_eq!(a.pending_count(), b.pending_count());
            prop_assert_eq!(a.online_count(), b.couriers().filter(|c| c.online).count());
            let open = a
                .calls()
                .filter(|c| c.kiosk_id.as_deref() == Some("k1") && !c.status.is_terminal())
                .count();
            prop_assert_eq!(a.open_for_kiosk("k1"), open, "open calls after {:?}", s);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn auto_mode_matches_reference(steps in proptest::collection::vec(step(), 1..80)) {
            run(Mode::Auto, &steps)?;
        }

        #[test]
        fn offer_mode_matches_reference(steps in proptest::collection::vec(step(), 1..80)) {
            run(Mode::Offer, &steps)?;
        }
    }
}
