//! The handheld's terminal front end: line commands in, one line per event out (text for a
//! person, JSON with `--json` for scripts).

use std::io::{BufRead, Write};

use pickup_protocol::{Job, JobKind};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::agent::{now_ms, Action, Agent, AgentEvent, EventKind, LinkState, Status};
use crate::geo::Point;

/// How the console behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsoleOptions {
    /// JSON lines instead of text.
    pub json: bool,
    /// Read commands from stdin (end of input quits); false: run until a signal.
    pub read_input: bool,
}

/// One line typed by the courier.
#[derive(Debug, Clone, PartialEq)]
pub enum Line {
    /// Nothing typed.
    Empty,
    /// An action on the current job.
    Act(Action),
    /// `shift on|off`.
    Shift(bool),
    /// `move <lat> <lon>`.
    Move(Point),
    /// `status`.
    Status,
    /// `help`.
    Help,
    /// `quit`.
    Quit,
}

/// The help text.
pub const HELP: &str = "commands:
  accept              take the offered job
  decline [reason]    refuse the offered job
  picked <code>       parcel collected; <code> is the customer's pickup code
  done                parcel delivered
  shift on|off        start or end the shift
  move <lat> <lon>    set the position (reported at once)
  status              show link, shift, position, job and queued replies
  help                this text
  quit                go offline and exit";

/// Parses one input line; the error says what was expected.
pub fn parse_line(line: &str) -> Result<Line, String> {
    let line = line.trim();
    let (cmd, rest) = match line.split_once(char::is_whitespace) {
        Some((c, r)) => (c, r.trim()),
        None => (line, ""),
    };
    let none = |l: Line| {
        if rest.is_empty() {
            Ok(l)
        } else {
            Err(format!("{cmd}: takes no arguments"))
        }
    };
    match cmd.to_ascii_lowercase().as_str() {
        "" => Ok(Line::Empty),
        "accept" | "a" => none(Line::Act(Action::Accept)),
        "decline" | "d" => Ok(Line::Act(Action::Decline(
            Some(rest.to_string()).filter(|r| !r.is_empty()),
        ))),
        "picked" | "p" => {
            if rest.is_empty() || rest.contains(char::is_whitespace) {
                Err("picked: give the customer's pickup code, like: picked 4821".into())
            } else {
                Ok(Line::Act(Action::PickedUp(rest.to_string())))
            }
        }
        "done" | "completed" => none(Line::Act(Action::Completed)),
        "shift" => match rest.to_ascii_lowercase().as_str() {
            "on" => Ok(Line::Shift(true)),
            "off" => Ok(Line::Shift(false)),
            _ => Err("shift: say shift on or shift off".into()),
        },
        "move" | "m" => {
            let bad = || "move: give latitude and longitude, like: move 37.5 127.0".to_string();
            let mut it = rest
                .split(|c: char| c.is_whitespace() || c == ',')
                .filter(|s| !s.is_empty());
            let lat: f64 = it.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
            let lon: f64 = it.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
            if it.next().is_some() {
                return Err(bad());
            }
            pickup_protocol::validate::lat_lon("move", lat, lon)?;
            Ok(Line::Move(Point::new(lat, lon)))
        }
        "status" | "s" => none(Line::Status),
        "help" | "h" | "?" => none(Line::Help),
        "quit" | "exit" | "q" => none(Line::Quit),
        other => Err(format!("unknown command {other:?}; type help")),
    }
}

/// Runs the console until `quit`, end of input, SIGINT or SIGTERM; then stops the agent
/// cleanly.
pub async fn run(agent: Agent, mut events: mpsc::Receiver<AgentEvent>, opts: ConsoleOptions) {
    let (line_tx, mut lines) = mpsc::channel::<String>(16);
    if opts.read_input {
        // Reading stdin blocks; a plain thread keeps it off the runtime.
        std::thread::spawn(move || {
            let stdin = std::io::stdin();
            for line in stdin.lock().lines() {
                let Ok(line) = line else { break };
                if line_tx.blocking_send(line).is_err() {
                    break;
                }
            }
        });
    } else {
        drop(line_tx);
    }
    let mut input_open = opts.read_input;
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM");
            None
        }
    };
    let out = Printer { json: opts.json };
    if !opts.json && opts.read_input {
        out.text(&format!(
            "courier {} starting; type help for commands",
            agent.courier_id()
        ));
    }
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Some(ev) => out.event(&ev, &agent.status()),
                None => break,
            },
            line = lines.recv(), if input_open => match line {
                None => break,
                Some(l) => match parse_line(&l) {
                    Ok(Line::Quit) => break,
                    Ok(cmd) => handle(&agent, cmd, &out).await,
                    Err(e) => out.error(&e),
                },
            },
            _ = tokio::signal::ctrl_c() => break,
            _ = recv_term(&mut term) => break,
        }
        input_open = input_open && !lines.is_closed();
    }
    agent.shutdown().await;
    while let Ok(ev) = events.try_recv() {
        out.event(&ev, &Status::placeholder());
    }
}

async fn recv_term(s: &mut Option<tokio::signal::unix::Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

async fn handle(agent: &Agent, cmd: Line, out: &Printer) {
    match cmd {
        Line::Empty | Line::Quit => {}
        Line::Help => out.text(HELP),
        Line::Status => out.status(&agent.status()),
        Line::Act(a) => {
            if let Err(e) = agent.act(a).await {
                out.error(&e.to_string());
            }
        }
        Line::Shift(on) => {
            if agent.set_available(on).await.is_err() {
                out.error("the agent has stopped");
            }
        }
        Line::Move(p) => match agent.move_to(p, true).await {
            Ok(()) => {
                if !out.json {
                    out.text(&format!("position set to {:.5},{:.5}", p.lat, p.lon));
                }
            }
            Err(e) => out.error(&e.to_string()),
        },
    }
}

impl Status {
    fn placeholder() -> Self {
        Status {
            courier_id: String::new(),
            link: LinkState::Offline,
            available: false,
            position: Point::new(0.0, 0.0),
            job: None,
            last_action: None,
            queued: 0,
            events_dropped: 0,
        }
    }
}

/// Writes lines to stdout.
struct Printer {
    json: bool,
}

#[derive(Serialize)]
struct JsonLine<'a, T: Serialize> {
    event: &'a str,
    #[serde(flatten)]
    body: T,
}

impl Printer {
    fn line(&self, s: &str) {
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "{s}");
        let _ = o.flush();
    }

    fn text(&self, s: &str) {
        if self.json {
            self.line(&json(&JsonLine {
                event: "info",
                body: serde_json::json!({ "message": s }),
            }));
        } else {
            self.line(s);
        }
    }

    fn error(&self, s: &str) {
        if self.json {
            self.line(&json(&JsonLine {
                event: "command_error",
                body: serde_json::json!({ "message": s }),
            }));
        } else {
            self.line(&format!("! {s}"));
        }
    }

    fn status(&self, s: &Status) {
        if self.json {
            self.line(&json(&JsonLine {
                event: "status",
                body: s,
            }));
            return;
        }
        let link = match s.link {
            LinkState::Offline => "OFFLINE (actions are queued)",
            LinkState::Connecting => "connecting",
            LinkState::Online => "online",
        };
        let shift = if s.available { "on shift" } else { "off shift" };
        self.line(&format!(
            "{}: {link}, {shift}, at {:.5},{:.5}, {} repl{} waiting for the center's answer",
            s.courier_id,
            s.position.lat,
            s.position.lon,
            s.queued,
            if s.queued == 1 { "y" } else { "ies" }
        ));
        match &s.job {
            Some(j) => self.line(&format!("  job: {}", describe_job(j, s.position))),
            None => self.line("  job: none"),
        }
        if let Some(a) = s.last_action {
            self.line(&format!("  your last action on it: {}", a.as_str()));
        }
    }

    fn event(&self, ev: &AgentEvent, status: &Status) {
        if self.json {
            self.line(&json(ev));
            return;
        }
        let s = match &ev.kind {
            EventKind::Connected { session_present } => format!(
                "connected to the broker ({})",
                if *session_present {
                    "session kept"
                } else {
                    "new session"
                }
            ),
            EventKind::Online { replayed } => {
                if *replayed > 0 {
                    format!(
                        "online; sending {replayed} repl{} taken while offline",
                        if *replayed == 1 { "y" } else { "ies" }
                    )
                } else {
                    "online".to_string()
                }
            }
            EventKind::Disconnected { error } => {
                format!("OFFLINE: {error}; actions will be queued and sent on reconnect")
            }
            EventKind::Job { job } => describe_job(job, status.position),
            EventKind::JobCleared => "no current job".to_string(),
            EventKind::Acted {
                reply,
                auto,
                offline,
            } => {
                let who = if *auto { "auto: " } else { "" };
                let what = match &reply.reason {
                    Some(r) => format!("{} ({r})", reply.action.as_str()),
                    None => reply.action.as_str().to_string(),
                };
                let when = if *offline {
                    "queued, will be sent on reconnect"
                } else {
                    "sent"
                };
                format!("{who}{what} call {}: {when}", reply.call_id)
            }
            EventKind::Delivered { .. } => return,
            EventKind::Answer {
                ok,
                duplicate,
                code,
                message,
                ..
            } => {
                if *ok && *duplicate {
                    "the center confirmed (it already had this)".to_string()
                } else if *ok {
                    "the center confirmed".to_string()
                } else {
                    format!(
                        "! the center refused: {} ({})",
                        message.as_deref().unwrap_or("no reason given"),
                        code.as_deref().unwrap_or("error")
                    )
                }
            }
            EventKind::Shift { available } => {
                if *available {
                    "on shift".to_string()
                } else {
                    "off shift".to_string()
                }
            }
            EventKind::Location { .. } => return,
            EventKind::QueueCorrupt { line, error } => {
                format!("! skipped line {line} of the queue file: {error}")
            }
            EventKind::Warning { message } => format!("! {message}"),
            EventKind::Stopped => "stopped".to_string(),
        };
        self.line(&s);
    }
}

/// One line about a job, for a person.
pub fn describe_job(j: &Job, here: Point) -> String {
    let call = j.call_id.as_deref().unwrap_or("?");
    let pickup = j
        .pickup
        .as_ref()
        .map(|l| {
            let d = here.distance_m(Point::new(l.lat, l.lon));
            let dist = if d >= 1000.0 {
                format!("{:.1} km", d / 1000.0)
            } else {
                format!("{d:.0} m")
            };
            match &l.label {
                Some(label) => format!(" at {label} ({:.5},{:.5}, {dist} away)", l.lat, l.lon),
                None => format!(" at {:.5},{:.5} ({dist} away)", l.lat, l.lon),
            }
        })
        .unwrap_or_default();
    let parcel = j
        .parcel
        .as_ref()
        .map(|p| match p.weight_kg {
            Some(w) => format!(", {} parcel {w} kg", p.class.as_str()),
            None => format!(", {} parcel", p.class.as_str()),
        })
        .unwrap_or_default();
    let tel = j
        .tel
        .as_ref()
        .map(|t| format!(", customer {t}"))
        .unwrap_or_default();
    let reason = j
        .reason
        .as_ref()
        .map(|r| format!(" ({r})"))
        .unwrap_or_default();
    match j.kind {
        JobKind::Offer => {
            let left = j
                .expires_at
                .map(|e| {
                    let s = (e - now_ms()) / 1000;
                    if s > 0 {
                        format!("; answer within {s} s")
                    } else {
                        "; the offer has expired".to_string()
                    }
                })
                .unwrap_or_default();
            format!("OFFER call {call}{pickup}{parcel}{tel}{left} -> accept | decline [reason]")
        }
        JobKind::Assigned => {
            format!("ASSIGNED call {call}{pickup}{parcel}{tel} -> at the pickup: picked <code>")
        }
        JobKind::PickedUp => format!("PICKED UP call {call}{parcel}: deliver it, then: done"),
        JobKind::Cancelled => format!("CANCELLED call {call}{reason}: drop it"),
        JobKind::Withdrawn => format!("WITHDRAWN call {call}{reason}"),
        JobKind::None => "no current job".to_string(),
    }
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse() {
        assert_eq!(parse_line("  accept "), Ok(Line::Act(Action::Accept)));
        assert_eq!(
            parse_line("decline too far away"),
            Ok(Line::Act(Action::Decline(Some("too far away".into()))))
        );
        assert_eq!(parse_line("decline"), Ok(Line::Act(Action::Decline(None))));
        assert_eq!(
            parse_line("picked 4821"),
            Ok(Line::Act(Action::PickedUp("4821".into())))
        );
        assert!(parse_line("picked").is_err());
        assert!(parse_line("picked 1 2").is_err());
        assert_eq!(parse_line("done"), Ok(Line::Act(Action::Completed)));
        assert_eq!(parse_line("shift OFF"), Ok(Line::Shift(false)));
        assert!(parse_line("shift maybe").is_err());
        assert_eq!(
            parse_line("move 37.5 127.25"),
            Ok(Line::Move(Point::new(37.5, 127.25)))
        );
        assert_eq!(
            parse_line("move 37.5,-0.5"),
            Ok(Line::Move(Point::new(37.5, -0.5)))
        );
        assert!(parse_line("move 91 0").unwrap_err().contains("lat"));
        assert!(parse_line("move x y").is_err());
        assert_eq!(parse_line(""), Ok(Line::Empty));
        assert_eq!(parse_line("quit"), Ok(Line::Quit));
        assert!(parse_line("accept now").is_err());
        assert!(parse_line("fly").unwrap_err().contains("unknown"));
    }

    #[test]
    fn jobs_read_well() {
        let j: Job = serde_json::from_str(
            r#"{"kind":"offer","call_id":"c1","pickup":{"lat":37.5,"lon":127.0,"label":"Gate 2"},
                "parcel":{"class":"light","weight_kg":3.5},"tel":"010-****-5678","expires_at":1,"at":1}"#,
        )
        .unwrap();
        let s = describe_job(&j, Point::new(37.5, 127.0));
        assert!(s.starts_with("OFFER call c1 at Gate 2"), "{s}");
        assert!(s.contains("0 m away"), "{s}");
        assert!(s.contains("expired"), "{s}");
    }
}
