//! `pickup-bench`: how fast pickupd is on this machine, measured against what the machine
//! and the broker allow in the same run.
//!
//! Layout:
//! - `load`: kiosks, couriers, the state watcher and the echo responder (MQTT clients);
//! - `setup`: the daemon under test (in-process or as a child process) and Mosquitto;
//! - `sqlite`: the commit-rate baseline and generated databases with many calls;
//! - `micro`: candidate search, grid index against the linear scan;
//! - `procstat`: CPU per thread and memory from `/proc`;
//! - `stats`: percentiles.
//!
//! docs/performance.md explains the modes, the figures and how to reproduce them.

mod load;
mod micro;
mod procstat;
mod setup;
mod sqlite;
mod stats;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use serde::Serialize;
use serde_json::{json, Value};

use crate::load::{PhaseOpts, PhaseResult, Rig, RigOpts};
use crate::procstat::{Memory, ThreadTimes};
use crate::setup::{BrokerChoice, DaemonChild, Mosquitto};
use crate::stats::ratio;

/// Measures pickupd on this machine against an MQTT echo and SQLite's commit rate.
///
/// Without a mode flag: the load run (SQLite baseline, echo baseline, pickupd flat out,
/// pickupd at half that rate). `--micro`, `--memory`, `--startup` run those measurements
/// instead; `--all` runs everything.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Measured seconds per load phase.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Unmeasured seconds at the start of each load phase.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Kiosk clients.
    #[arg(long, default_value_t = 16)]
    kiosks: usize,
    /// Requests in flight per kiosk when flat out.
    #[arg(long, default_value_t = 4)]
    window: usize,
    /// Courier clients (each finishes its jobs at once, so it is free again).
    #[arg(long, default_value_t = 32)]
    couriers: usize,
    /// Only the create scenario: couriers keep their first job (later calls wait for a
    /// courier, as in a rush) and the limit on calls waiting for a courier
    /// (limits.max_dispatching) is lifted, so that nothing is shed for it.
    #[arg(long, conflicts_with = "lifecycle_only")]
    create_only: bool,
    /// Only the lifecycle scenario: couriers pick up and complete every job at once.
    #[arg(long)]
    lifecycle_only: bool,
    /// Only this offered rate (calls/s), open loop, instead of flat out + half rate.
    #[arg(long)]
    rate: Option<f64>,
    /// An external broker (mqtt://host:port) for the daemon and every client.
    #[arg(long, conflicts_with = "mosquitto")]
    broker: Option<String>,
    /// Start Debian's mosquitto on a free port and use it.
    #[arg(long)]
    mosquitto: bool,
    /// Leave Nagle on in the broker (embedded: broker.tcp_nodelay = false; with
    /// --mosquitto: set_tcp_nodelay false). Shows what the missing TCP_NODELAY costs.
    #[arg(long)]
    nagle: bool,
    /// Embedded broker: connect the daemon (and the echo responder) over the loopback
    /// listener instead of in process (`mqtt.in_process = false`). Shows what the
    /// in-process connection saves.
    #[arg(long, conflicts_with_all = ["mosquitto", "broker"])]
    daemon_over_tcp: bool,
    /// Run the daemon without logging (by default it logs at info to DIR/pickupd.log, as
    /// in production, where each accepted call is one log line).
    #[arg(long)]
    no_log: bool,
    /// Worker threads of the daemon's tokio runtime (pickupd runs 2).
    #[arg(long, default_value_t = 2)]
    daemon_workers: usize,
    /// Seconds of the SQLite commit-rate baseline.
    #[arg(long, default_value_t = 3.0)]
    sqlite_secs: f64,
    /// Directory for databases and logs (default: a fresh temporary directory). Use one
    /// on the disk the daemon will use: the baselines are about that disk.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Write the results as JSON to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Candidate search micro-benchmark only.
    #[arg(long)]
    micro: bool,
    /// Couriers in the micro-benchmark.
    #[arg(long, default_value_t = 100_000)]
    micro_couriers: usize,
    /// Queries per round in the micro-benchmark.
    #[arg(long, default_value_t = 500)]
    micro_queries: usize,
    /// Rounds in the micro-benchmark.
    #[arg(long, default_value_t = 5)]
    micro_rounds: usize,
    /// Memory only: daemon RSS with many couriers online and many calls stored.
    #[arg(long)]
    memory: bool,
    /// Couriers online for --memory.
    #[arg(long, default_value_t = 10_000)]
    mem_couriers: usize,
    /// Couriers announced per second for --memory (0: as fast as the connection takes
    /// them; the daemon then sheds position updates and the missing couriers are
    /// announced again).
    #[arg(long, default_value_t = 0.0)]
    mem_announce_per_s: f64,
    /// Calls in the database for --memory.
    #[arg(long, default_value_t = 100_000)]
    mem_calls: usize,
    /// Days of finished calls in the generated databases (the daemon keeps 30 by default
    /// and republishes the retained state of every call within them at start).
    #[arg(long, default_value_t = 29)]
    history_days: i64,
    /// Start-up only: start to READY with many calls in the database.
    #[arg(long)]
    startup: bool,
    /// Calls in the database for --startup (the file is kept in DIR and reused).
    #[arg(long, default_value_t = 1_000_000)]
    startup_calls: usize,
    /// Starts measured for --startup.
    #[arg(long, default_value_t = 3)]
    startup_runs: usize,
    /// Seconds --startup waits for the daemon's republishing of retained state.
    #[arg(long, default_value_t = 120)]
    republish_wait_s: u64,
    /// Drop the page cache before each start (root only): a cold start as after a boot.
    #[arg(long)]
    cold: bool,
    /// Everything: load run, micro, memory, start-up.
    #[arg(long)]
    all: bool,
    /// Keep SQLite's allocation statistics on (a global mutex around every allocation),
    /// as the daemon had them before it turned them off (`store::configure_sqlite`):
    /// what that setting gains, in one binary.
    #[arg(long)]
    sqlite_memstatus: bool,
    #[command(subcommand)]
    child: Option<ChildCmd>,
}

#[derive(Subcommand, Debug)]
enum ChildCmd {
    /// (internal) Runs the daemon alone in this process for --memory and --startup.
    #[command(hide = true)]
    DaemonChild {
        #[arg(long)]
        site: String,
        #[arg(long)]
        db: PathBuf,
        #[arg(long)]
        url: Option<String>,
        #[arg(long)]
        log: Option<PathBuf>,
    },
}

fn main() {
    let started = Instant::now();
    let args = Args::parse();
    if let Some(ChildCmd::DaemonChild { site, db, url, log }) = &args.child {
        if let Some(l) = log {
            init_log(l);
        }
        if let Err(e) = setup::run_child(started, site, db, url.as_deref()) {
            eprintln!("daemon-child: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    if args.sqlite_memstatus {
        // SAFETY: called once, before any SQLite connection exists in this process;
        // SQLITE_CONFIG_MEMSTATUS takes one int argument. Initialising SQLite right after
        // fixes the setting, so the daemon's own configure_sqlite() leaves it alone.
        let rc = unsafe {
            rusqlite::ffi::sqlite3_config(rusqlite::ffi::SQLITE_CONFIG_MEMSTATUS, 1 as libc::c_int);
            rusqlite::ffi::sqlite3_initialize()
        };
        if rc != rusqlite::ffi::SQLITE_OK {
            eprintln!("pickup-bench: sqlite3_initialize failed ({rc})");
        }
    } else {
        // As the daemon runs: before the SQLite baseline opens the first connection.
        pickupd::store::configure_sqlite();
    }
    if let Err(e) = run(args) {
        eprintln!("pickup-bench: {e:#}");
        std::process::exit(1);
    }
}

fn init_log(path: &Path) {
    let Ok(f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    else {
        return;
    };
    let filter = tracing_subscriber::EnvFilter::new(pickupd::logging::filter_for("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::sync::Mutex::new(f))
        .with_ansi(false)
        .with_target(false)
        .try_init();
}

fn run(args: Args) -> anyhow::Result<()> {
    let tmp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new().prefix("pickup-bench").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let mut report = BTreeMap::<String, Value>::new();
    report.insert("machine".into(), machine(&dir));
    let modes_given = args.micro || args.memory || args.startup;
    let load = args.all || !modes_given;
    if load {
        report.insert("load".into(), load_run(&args, &dir)?);
    }
    if args.all || args.micro {
        println!("\n== candidate search: grid index vs linear scan ==");
        let r = micro::run(args.micro_couriers, args.micro_queries, args.micro_rounds);
        println!(
            "{:<26} {:>9} {:>12} {:>12} {:>9} {:>10}",
            "scenario", "couriers", "grid p50", "linear p50", "speedup", "mismatch"
        );
        for s in &r {
            println!(
                "{:<26} {:>9} {:>12} {:>12} {:>8.1}x {:>10}",
                s.scenario,
                s.couriers,
                micro::us(s.grid.p50_ms),
                micro::us(s.linear.p50_ms),
                s.speedup_median,
                s.mismatches
            );
        }
        report.insert("micro".into(), serde_json::to_value(&r)?);
    }
    if args.all || args.memory {
        report.insert("memory".into(), memory_run(&args, &dir)?);
    }
    if args.all || args.startup {
        report.insert("startup".into(), startup_run(&args, &dir)?);
    }
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_vec_pretty(&report)?)?;
        println!("\nresults written to {}", out.display());
    }
    Ok(())
}

fn machine(dir: &Path) -> Value {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    json!({"cpus": cpus, "cpu_model": model, "kernel": kernel, "dir": dir.display().to_string(),
           "at_unix_ms": pickupd::store::now_ms()})
}

fn runtime(name: &str, workers: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(name)
        .enable_all()
        .build()?)
}

fn site() -> String {
    format!("bench{:06x}", rand::random::<u32>() & 0xff_ffff)
}

/// CPU seconds per group over a phase, and per daemon thread.
#[derive(Debug, Clone, Serialize)]
struct Cpu {
    /// Wall seconds of the phase (warm-up included).
    wall_s: f64,
    /// CPU seconds per group (daemon, broker, clients, other).
    groups: BTreeMap<String, f64>,
    /// CPU seconds per daemon thread name.
    daemon_threads: BTreeMap<String, f64>,
    /// Daemon CPU as a share of one core.
    daemon_core_share: f64,
    /// Daemon CPU microseconds per accepted request.
    daemon_us_per_accepted: f64,
    /// Broker CPU microseconds per accepted request.
    broker_us_per_accepted: f64,
}

struct CpuMark {
    at: Instant,
    own: ThreadTimes,
    broker: Option<(u32, ThreadTimes)>,
}

impl CpuMark {
    fn now(broker_pid: Option<u32>) -> Self {
        Self {
            at: Instant::now(),
            own: ThreadTimes::read(None),
            broker: broker_pid.map(|p| (p, ThreadTimes::read(Some(p)))),
        }
    }

    fn since(&self, accepted: u64) -> Cpu {
        let wall_s = self.at.elapsed().as_secs_f64();
        let now = ThreadTimes::read(None);
        let mut groups = now.since(&self.own);
        if let Some((pid, before)) = &self.broker {
            let b: f64 = ThreadTimes::read(Some(*pid)).since(before).values().sum();
            *groups.entry("broker".into()).or_default() += b;
        }
        let daemon = groups.get("daemon").copied().unwrap_or(0.0);
        let broker = groups.get("broker").copied().unwrap_or(0.0);
        Cpu {
            wall_s,
            daemon_threads: now.threads_since(&self.own, "daemon"),
            groups,
            daemon_core_share: daemon / wall_s.max(1e-9),
            daemon_us_per_accepted: ratio(daemon * 1e6, accepted as f64),
            broker_us_per_accepted: ratio(broker * 1e6, accepted as f64),
        }
    }
}

/// Counters of the daemon's writer and publisher, to report what one phase did.
#[derive(Debug, Clone, Copy, Default)]
struct StoreMark {
    commits: u64,
    jobs: u64,
    published: u64,
}

fn store_mark(r: &pickupd::app::Running) -> StoreMark {
    StoreMark {
        commits: r.writer_stats.commits.load(Ordering::Relaxed),
        jobs: r.writer_stats.jobs.load(Ordering::Relaxed),
        published: r.publisher_stats.published.load(Ordering::Relaxed),
    }
}

fn store_since(r: &pickupd::app::Running, m: StoreMark, seconds: f64) -> Value {
    let n = store_mark(r);
    let commits = n.commits - m.commits;
    let jobs = n.jobs - m.jobs;
    json!({
        "commits": commits,
        "commits_per_s": commits as f64 / seconds.max(1e-9),
        "jobs": jobs,
        "jobs_per_commit": ratio(jobs as f64, commits as f64),
        "published": n.published - m.published,
        "outbox_unacked_at_end": r.publisher_stats.unacked.load(Ordering::Relaxed),
        "writer_queued_at_end": r.writer_stats.queued.load(Ordering::Relaxed),
    })
}

/// One phase's figures: what the clients saw, CPU, and the daemon's store counters.
type Measured = (PhaseResult, Cpu, Value);

/// What one daemon did under one workload.
struct ScenarioOut {
    /// `create` or `lifecycle`.
    name: &'static str,
    /// The echo baseline, when this scenario measured it.
    echo: Option<Measured>,
    /// pickupd flat out, then at half that rate (or at --rate only).
    runs: Vec<Measured>,
    /// Messages the state watcher received.
    states_seen: u64,
}

fn load_run(args: &Args, dir: &Path) -> anyhow::Result<Value> {
    let broker = match (&args.broker, args.mosquitto) {
        (Some(u), _) => BrokerChoice::External(u.clone()),
        (None, true) => BrokerChoice::Mosquitto {
            nodelay: !args.nagle,
        },
        (None, false) => BrokerChoice::Embedded {
            nodelay: !args.nagle,
            in_process: !args.daemon_over_tcp,
        },
    };
    println!("== pickupd load run: {} ==", broker.describe());
    println!("dir {}", dir.display());
    println!(
        "{} kiosks x {} in flight, {} couriers, phases of {} s after {} s warm-up",
        args.kiosks, args.window, args.couriers, args.duration, args.warmup
    );
    // SQLite's own commit rate on this disk.
    let sq = sqlite::commit_rate(dir, Duration::from_secs_f64(args.sqlite_secs))?;
    println!(
        "sqlite baseline: {:.0} commits/s (p50 {:.2} ms, p99 {:.2} ms): {}",
        sq.commits_per_s, sq.commit_latency.p50_ms, sq.commit_latency.p99_ms, sq.settings
    );
    let mosq = match &broker {
        BrokerChoice::Mosquitto { nodelay } => Some(Mosquitto::start(dir, *nodelay)?),
        _ => None,
    };
    let url = match (&broker, &mosq) {
        (BrokerChoice::External(u), _) => Some(u.clone()),
        (_, Some(m)) => Some(format!("mqtt://{}", m.addr)),
        _ => None,
    };
    if !args.no_log {
        init_log(&dir.join("pickupd.log"));
    }
    let broker_pid = mosq.as_ref().map(Mosquitto::pid);
    let which: Vec<bool> = match (args.create_only, args.lifecycle_only) {
        (true, false) => vec![true],
        (false, true) => vec![false],
        _ => vec![true, false],
    };
    let mut scenarios = Vec::new();
    for (i, create_only) in which.into_iter().enumerate() {
        scenarios.push(scenario(
            args,
            dir,
            &broker,
            url.as_deref(),
            broker_pid,
            create_only,
            i == 0,
        )?);
    }
    let peak = Memory::read(None);
    drop(mosq);
    let echo = scenarios
        .iter()
        .find_map(|s| s.echo.clone())
        .ok_or_else(|| anyhow::anyhow!("no echo baseline measured"))?;
    let echo_rate = echo.0.accepted_per_s;

    // The table.
    println!(
        "\n{:<10} {:<14} {:>8} {:>6} {:>6} {:>7} {:>7} {:>7} {:>8} | {:>8} {:>8} | {:>7} {:>7}",
        "scenario",
        "phase",
        "ok/s",
        "busy",
        "t/o",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms",
        "c→a p50",
        "c→a p99",
        "daemon",
        "broker"
    );
    let row = |scen: &str, r: &PhaseResult, c: &Cpu| {
        let phase = match r.offered_rate {
            None => "flat out".to_string(),
            Some(x) => format!("at {x:.0}/s"),
        };
        let (ca50, ca99) = if r.create_to_assigned.count > 0 {
            (
                format!("{:.2}", r.create_to_assigned.p50_ms),
                format!("{:.2}", r.create_to_assigned.p99_ms),
            )
        } else {
            ("-".into(), "-".into())
        };
        println!(
            "{scen:<10} {phase:<14} {:>8.0} {:>6} {:>6} {:>7.2} {:>7.2} {:>7.2} {:>8.2} | {:>8} {:>8} | {:>5.0}µs {:>5.0}µs",
            r.accepted_per_s, r.busy, r.timeouts, r.latency.p50_ms, r.latency.p95_ms,
            r.latency.p99_ms, r.latency.max_ms, ca50, ca99,
            c.daemon_us_per_accepted, c.broker_us_per_accepted
        );
    };
    println!(
        "{:<10} {:<14} {:>8.0} {:>6} {:>6} {:>7.2} {:>7.2} {:>7.2} {:>8.2} | {:>8} {:>8} |",
        "sqlite",
        "1-row commits",
        sq.commits_per_s,
        "-",
        "-",
        sq.commit_latency.p50_ms,
        sq.commit_latency.p95_ms,
        sq.commit_latency.p99_ms,
        sq.commit_latency.max_ms,
        "-",
        "-"
    );
    row("echo", &echo.0, &echo.1);
    for s in &scenarios {
        for (r, c, _) in &s.runs {
            row(s.name, r, c);
        }
    }
    println!("(daemon, broker: CPU per accepted request, warm-up included; c→a: create → call seen assigned on its state topic)");
    for s in &scenarios {
        for (r, c, st) in &s.runs {
            println!(
                "  {} {}: daemon threads {}; store {} commits ({:.0}/s, {:.1} jobs each); outbox unacked at end {}",
                s.name,
                r.offered_rate.map_or("flat out".into(), |x| format!("at {x:.0}/s")),
                c.daemon_threads
                    .iter()
                    .map(|(k, v)| format!("{k} {v:.2} s"))
                    .collect::<Vec<_>>()
                    .join(", "),
                st["commits"],
                st["commits_per_s"].as_f64().unwrap_or(0.0),
                st["jobs_per_commit"].as_f64().unwrap_or(0.0),
                st["outbox_unacked_at_end"]
            );
        }
    }
    println!(
        "  process peak RSS (daemon, broker and clients together): {:.1} MiB",
        peak.peak_rss_mib
    );

    // Ratios: the create path against the baselines.
    let head = scenarios
        .iter()
        .find(|s| s.name == "create")
        .unwrap_or(&scenarios[0]);
    let max = &head.runs[0].0;
    let mut ratios = json!({
        "scenario": head.name,
        "accepted_per_s": max.accepted_per_s,
        "echo_per_s": echo_rate,
        "sqlite_commits_per_s": sq.commits_per_s,
        "accepted_per_s_vs_echo_per_s": ratio(max.accepted_per_s, echo_rate),
        "accepted_per_s_vs_sqlite_commits_per_s": ratio(max.accepted_per_s, sq.commits_per_s),
        "p50_vs_echo_p50": ratio(max.latency.p50_ms, echo.0.latency.p50_ms),
        "p99_vs_echo_p99": ratio(max.latency.p99_ms, echo.0.latency.p99_ms),
    });
    if let Some((half, _, _)) = head.runs.get(1) {
        ratios["half_rate"] = json!(half.offered_rate);
        ratios["half_rate_p99_ms"] = json!(half.latency.p99_ms);
        ratios["half_rate_p99_vs_sqlite_commit_p99"] =
            json!(ratio(half.latency.p99_ms, sq.commit_latency.p99_ms));
    }
    println!(
        "\nratios ({} scenario flat out against the baselines):",
        head.name
    );
    println!(
        "  accepted/s ÷ echo/s            {:>7.3}   ({:.0} / {:.0})",
        ratio(max.accepted_per_s, echo_rate),
        max.accepted_per_s,
        echo_rate
    );
    println!(
        "  accepted/s ÷ sqlite commits/s  {:>7.3}   ({:.0} / {:.0})",
        ratio(max.accepted_per_s, sq.commits_per_s),
        max.accepted_per_s,
        sq.commits_per_s
    );
    println!(
        "  p50 ÷ echo p50                 {:>7.2}   ({:.2} ms / {:.2} ms)",
        ratio(max.latency.p50_ms, echo.0.latency.p50_ms),
        max.latency.p50_ms,
        echo.0.latency.p50_ms
    );
    println!(
        "  p99 ÷ echo p99                 {:>7.2}   ({:.2} ms / {:.2} ms)",
        ratio(max.latency.p99_ms, echo.0.latency.p99_ms),
        max.latency.p99_ms,
        echo.0.latency.p99_ms
    );
    if let Some((half, _, _)) = head.runs.get(1) {
        println!(
            "  p99 create→accepted at half the maximum rate ({:.0}/s): {:.2} ms = {:.2} x the p99 of one SQLite commit ({:.2} ms), {:.2} x the echo p99",
            half.offered_rate.unwrap_or(0.0),
            half.latency.p99_ms,
            ratio(half.latency.p99_ms, sq.commit_latency.p99_ms),
            sq.commit_latency.p99_ms,
            ratio(half.latency.p99_ms, echo.0.latency.p99_ms)
        );
    }
    Ok(json!({
        "broker": broker.describe(),
        "kiosks": args.kiosks, "window": args.window, "couriers": args.couriers,
        "daemon_logging": !args.no_log,
        "sqlite_baseline": sq,
        "echo_baseline": {"result": echo.0, "cpu": echo.1},
        "scenarios": scenarios.iter().map(|s| json!({
            "name": s.name,
            "phases": s.runs.iter().map(|(r, c, st)| json!({"result": r, "cpu": c, "store": st})).collect::<Vec<_>>(),
            "state_messages_seen": s.states_seen,
        })).collect::<Vec<_>>(),
        "ratios": ratios,
        "process_peak_rss_mib": peak.peak_rss_mib,
    }))
}

/// Starts a fresh daemon (new site, new database), connects the clients, measures the
/// echo baseline when asked, then pickupd flat out and at half that rate.
/// `create_only`: couriers keep their first job and the limit on waiting calls is lifted
/// (the create path alone); otherwise couriers pick up and complete every job at once.
fn scenario(
    args: &Args,
    dir: &Path,
    broker: &BrokerChoice,
    url: Option<&str>,
    broker_pid: Option<u32>,
    create_only: bool,
    with_echo: bool,
) -> anyhow::Result<ScenarioOut> {
    let name = if create_only { "create" } else { "lifecycle" };
    let site = site();
    let db = dir.join(format!("{site}.db"));
    let mut cfg = setup::daemon_config(&site, &db, broker, url);
    if create_only {
        cfg.limits.max_dispatching = 10_000_000;
    }
    let drt = runtime("pickupd-rt", args.daemon_workers)?;
    let brt = runtime("bench-client", 2)?;
    let running = drt.block_on(async {
        let r = pickupd::app::start(cfg).await?;
        let mut ready = r.ready.clone();
        tokio::time::timeout(Duration::from_secs(30), ready.wait_for(|x| *x)).await??;
        anyhow::Ok(r)
    })?;
    let addr = running.broker_addr;
    let stats = running.stats.clone();
    let rig_opts = RigOpts {
        site: site.clone(),
        kiosks: args.kiosks,
        couriers: args.couriers,
        finish_jobs: !create_only,
        // The create path alone reports no create→assigned figures (couriers keep their
        // first job); a subscriber to every call's state would only add its deliveries to
        // what the run charges the create path, and the echo has no such subscriber.
        watch_states: !create_only,
    };
    let phase = |echo: bool, rate: Option<f64>| PhaseOpts {
        echo,
        rate,
        window: args.window,
        warmup: Duration::from_secs_f64(args.warmup),
        duration: Duration::from_secs_f64(args.duration),
    };
    println!(
        "\n-- scenario {name}: {} --",
        if create_only {
            "the create path alone (couriers keep their first job, waiting calls not limited)"
        } else {
            "couriers pick up and complete each job at once (three requests and about ten messages per call)"
        }
    );
    let running = Arc::new(running);
    let r2 = running.clone();
    let result = brt.block_on(async move {
        let running = r2;
        let rig = Rig::connect(addr, &rig_opts, || {
            stats.couriers_online.load(Ordering::Relaxed)
        })
        .await?;
        let echo = if with_echo {
            // A trivial responder through the same broker, same client library and QoS.
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
            // In process when the daemon is, so that the baseline's responder costs the
            // broker what the daemon's connection does.
            let local = match broker {
                BrokerChoice::Embedded {
                    in_process: true, ..
                } => match running.broker.as_ref() {
                    Some(b) => Some(b.connect_in_process(
                        &format!("bench-echo-{}", rand::random::<u32>()),
                        false,
                        100,
                    )?),
                    None => None,
                },
                _ => None,
            };
            let responder = tokio::spawn(load::echo_responder(
                addr,
                rig.echo_topic().to_string(),
                ready_tx,
                stop_rx,
                local,
            ));
            tokio::time::timeout(Duration::from_secs(10), ready_rx).await??;
            let echo = measured(&rig, phase(true, None), broker_pid, None).await;
            let _ = stop_tx.send(true);
            let _ = responder.await;
            print_phase("echo, flat out", &echo.0);
            Some(echo)
        } else {
            None
        };
        let mut runs = Vec::new();
        let first = args.rate;
        let m = measured(&rig, phase(false, first), broker_pid, Some(&running)).await;
        print_phase(&label(first), &m.0);
        runs.push(m);
        rig.quiesce(Duration::from_secs(10)).await;
        if args.rate.is_none() {
            let half = (runs[0].0.accepted_per_s / 2.0).max(1.0);
            let m = measured(&rig, phase(false, Some(half)), broker_pid, Some(&running)).await;
            print_phase(&label(Some(half)), &m.0);
            runs.push(m);
            rig.quiesce(Duration::from_secs(10)).await;
        }
        let states = rig.states_seen();
        rig.close().await;
        anyhow::Ok((echo, runs, states))
    });
    let running =
        Arc::try_unwrap(running).map_err(|_| anyhow::anyhow!("daemon handle still shared"))?;
    drt.block_on(running.shutdown(Duration::from_secs(30)))?;
    drop(brt);
    drop(drt);
    remove_db(&db);
    let (echo, runs, states_seen) = result?;
    Ok(ScenarioOut {
        name,
        echo,
        runs,
        states_seen,
    })
}

fn label(rate: Option<f64>) -> String {
    match rate {
        None => "pickupd, flat out".into(),
        Some(r) => format!("pickupd at {r:.0}/s"),
    }
}

async fn measured(
    rig: &Rig,
    p: PhaseOpts,
    broker_pid: Option<u32>,
    running: Option<&pickupd::app::Running>,
) -> (PhaseResult, Cpu, Value) {
    let mark = CpuMark::now(broker_pid);
    let sm = running.map(store_mark);
    let r = rig.phase(p).await;
    let cpu = mark.since(r.accepted);
    let store = match (running, sm) {
        (Some(run), Some(m)) => store_since(run, m, cpu.wall_s),
        _ => Value::Null,
    };
    (r, cpu, store)
}

fn print_phase(name: &str, r: &PhaseResult) {
    println!(
        "{name:<22} {:>8.0} ok/s  sent {:>7} ok {:>7} busy {:>5} err {:>3} t/o {:>3} | latency p50 {:>6.2} p95 {:>6.2} p99 {:>6.2} max {:>7.2} ms",
        r.accepted_per_s, r.sent, r.accepted, r.busy, r.errors, r.timeouts,
        r.latency.p50_ms, r.latency.p95_ms, r.latency.p99_ms, r.latency.max_ms
    );
    if r.kind == "create" && r.create_to_assigned.count == 0 && r.not_seen_assigned == 0 {
        println!(
            "{:<22} create→assigned not followed (no state watcher in this scenario); jobs finished {}",
            "", r.jobs_finished
        );
    } else if r.kind == "create" {
        println!(
            "{:<22} create→assigned p50 {:.2} p95 {:.2} p99 {:.2} max {:.2} ms ({} seen, {} not seen); jobs finished {}, job errors {}",
            "",
            r.create_to_assigned.p50_ms,
            r.create_to_assigned.p95_ms,
            r.create_to_assigned.p99_ms,
            r.create_to_assigned.max_ms,
            r.create_to_assigned.count,
            r.not_seen_assigned,
            r.jobs_finished,
            r.job_errors
        );
    }
}

/// The daemon's log line once it has republished the retained state after a start.
const REPUBLISHED: &str = "retained state republished";

fn memory_run(args: &Args, dir: &Path) -> anyhow::Result<Value> {
    println!(
        "\n== memory: {} couriers online, {} calls in the database ==",
        args.mem_couriers, args.mem_calls
    );
    let h = sqlite::History {
        calls: args.mem_calls,
        recent: 2_000.min(args.mem_calls / 2),
        live: 0,
        events_per_call: 5,
        days: args.history_days,
    };
    let src = dir.join(format!("mem-{}-{}d.db", args.mem_calls, args.history_days));
    let g = sqlite::generate(&src, h)?;
    println!(
        "database: {:.0} MiB, {} days of history{}",
        g.size_mib,
        h.days,
        if g.seconds > 0.0 {
            format!(", written in {:.1} s", g.seconds)
        } else {
            ", reused".into()
        }
    );
    let mut brokers = vec![("embedded", None::<Mosquitto>)];
    match Mosquitto::start(dir, true) {
        Ok(m) => brokers.push(("mosquitto", Some(m))),
        Err(e) => println!("(mosquitto not measured: {e})"),
    }
    let brt = runtime("bench-client", 2)?;
    let mut out = Vec::new();
    for (name, mosq) in brokers {
        let db = dir.join(format!("mem-run-{name}.db"));
        // A WAL file left next to a copied database would be replayed onto it.
        remove_db(&db);
        std::fs::copy(&src, &db)?;
        let site = site();
        let url = mosq.as_ref().map(|m| format!("mqtt://{}", m.addr));
        let mut child = DaemonChild::spawn(
            &site,
            &db,
            url.as_deref(),
            Some(&dir.join(format!("child-{site}.log"))),
        )?;
        let pid = child.pid();
        let at_ready = Memory::read(Some(pid));
        // At start the daemon republishes the retained state of every call within the
        // retention period; let that finish first.
        let republished = child.wait_log(REPUBLISHED, Duration::from_secs(600));
        let drained = child.wait_idle(Duration::from_secs(1), Duration::from_secs(600))?;
        let idle = Memory::read(Some(pid));
        println!(
            "{name:<10} READY at {:.0} ms: RSS {:.1} MiB; republishing queued by {}, sent {:.1} s later: RSS {:.1} MiB, peak {:.1} MiB",
            child.ready_ms_outside,
            at_ready.rss_mib,
            republished.map_or("never".into(), |d| format!("{:.0} ms", d.as_secs_f64() * 1e3)),
            drained.as_secs_f64(),
            idle.rss_mib,
            idle.peak_rss_mib
        );
        let addr = child.addr;
        let n = args.mem_couriers;
        let t0 = Instant::now();
        // Every courier online and positioned, as the daemon recorded it. The daemon sheds
        // position updates when its input queue is full (they are superseded by the next
        // one), so couriers not yet positioned send theirs again, as handhelds do.
        let conn =
            rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        let positioned =
            "SELECT id FROM couriers WHERE online = 1 AND json_extract(body, '$.lat') IS NOT NULL";
        let mut todo: Vec<usize> = (0..n).collect();
        let mut links = Vec::new();
        let mut sends = 0usize;
        let end = Instant::now() + Duration::from_secs(120);
        while !todo.is_empty() {
            if Instant::now() > end {
                anyhow::bail!(
                    "only {} of {n} couriers recorded after 120 s",
                    n - todo.len()
                );
            }
            sends += todo.len();
            let batch = std::mem::take(&mut todo);
            let s = site.clone();
            links.push(brt.block_on(load::announce_couriers(
                addr,
                &s,
                batch,
                8_000.0,
                args.mem_announce_per_s,
            ))?);
            child.wait_idle(Duration::from_millis(500), Duration::from_secs(60))?;
            let mut st = conn.prepare(positioned)?;
            let done: std::collections::HashSet<String> = st
                .query_map([], |r| r.get::<_, String>(0))?
                .collect::<Result<_, _>>()?;
            todo = (0..n)
                .filter(|i| !done.contains(&load::announced_id(*i)))
                .collect();
        }
        let settle_s = t0.elapsed().as_secs_f64();
        let m = Memory::read(Some(pid));
        // Steady state: the couriers stay online, nothing else happens, for one check of
        // the daemon's own trimmer (pickupd::memory) and a little more.
        let steady_after = pickupd::memory::CHECK_EVERY + Duration::from_secs(2);
        std::thread::sleep(steady_after);
        let steady = Memory::read(Some(pid));
        let trim = child.trim()?;
        let trimmed = Memory::read(Some(pid));
        println!(
            "{:<10} with {n} couriers online: RSS {:.1} MiB (heap and stacks {:.1}, files {:.1}; peak {:.1}); recorded in {:.1} s ({sends} announcements)",
            "", m.rss_mib, m.anon_mib, m.file_mib, m.peak_rss_mib, settle_s
        );
        println!(
            "{:<10} {:.0} s later, steady: RSS {:.1} MiB (heap and stacks {:.1}, files {:.1})",
            "",
            steady_after.as_secs_f64(),
            steady.rss_mib,
            steady.anon_mib,
            steady.file_mib
        );
        println!(
            "{:<10} after the allocator returned free pages (malloc_trim, {:.1} ms): RSS {:.1} MiB (heap and stacks {:.1}); heap in use {:.1} MiB of {:.1} held",
            "", trim.ms, trimmed.rss_mib, trimmed.anon_mib, trim.heap_in_use_mib, trim.heap_held_mib
        );
        out.push(json!({
            "broker": name, "couriers": n, "calls_in_db": args.mem_calls,
            "calls_loaded": h.recent + h.live,
            "ready_ms": child.ready_ms_outside, "rss_at_ready_mib": at_ready.rss_mib,
            "republish_queued_ms": republished.map(|d| d.as_secs_f64() * 1e3),
            "republish_sent_s": drained.as_secs_f64(),
            "rss_after_republish_mib": idle.rss_mib, "peak_rss_after_republish_mib": idle.peak_rss_mib,
            "rss_mib": m.rss_mib, "anon_mib": m.anon_mib, "file_mib": m.file_mib,
            "peak_rss_mib": m.peak_rss_mib, "rss_after_trim_mib": trimmed.rss_mib,
            "steady_after_s": steady_after.as_secs_f64(), "rss_steady_mib": steady.rss_mib,
            "anon_steady_mib": steady.anon_mib, "file_steady_mib": steady.file_mib,
            "malloc_trim_ms": trim.ms, "heap_in_use_mib": trim.heap_in_use_mib,
            "heap_held_mib": trim.heap_held_mib,
            "couriers_recorded_s": settle_s, "announcements_sent": sends,
        }));
        drop(conn);
        child.stop()?;
        drop(links);
        drop(mosq);
        remove_db(&db);
    }
    Ok(json!({"database": g, "runs": out}))
}

/// Removes a database with its WAL and shared-memory files.
fn remove_db(db: &Path) {
    for ext in ["", "-wal", "-shm"] {
        let mut p = db.as_os_str().to_owned();
        p.push(ext);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
}

fn drop_caches() -> bool {
    // SAFETY: sync(2) takes no arguments and only flushes buffers.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", b"3").is_ok()
}

fn startup_run(args: &Args, dir: &Path) -> anyhow::Result<Value> {
    println!(
        "\n== start to READY with {} calls in the database ==",
        args.startup_calls
    );
    let h = sqlite::History {
        calls: args.startup_calls,
        recent: 1_000.min(args.startup_calls / 2),
        live: 100.min(args.startup_calls / 4),
        events_per_call: 5,
        days: args.history_days,
    };
    let db = dir.join(format!(
        "startup-{}-{}d.db",
        args.startup_calls, args.history_days
    ));
    let g = sqlite::generate(&db, h)?;
    println!(
        "database: {:.0} MiB ({}), {}",
        g.size_mib,
        db.display(),
        if g.seconds > 0.0 {
            format!("written in {:.1} s", g.seconds)
        } else {
            "reused".into()
        }
    );
    let plans = sqlite::start_query_plans(&db)?;
    for (q, steps) in &plans {
        println!("  plan: {q}\n        {}", steps.join(" | "));
    }
    let mut runs = Vec::new();
    for i in 0..args.startup_runs {
        let cold = args.cold && drop_caches();
        // Where the time goes: the store's part, measured on its own first.
        let t = Instant::now();
        let conn = pickupd::store::open(&db)?;
        let open_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let loaded = pickupd::store::load(&conn, &db, pickupd::store::now_ms(), 600_000)?;
        let load_ms = t.elapsed().as_secs_f64() * 1e3;
        drop(conn);
        if args.cold {
            drop_caches();
        }
        let site = site();
        let child = DaemonChild::spawn(
            &site,
            &db,
            None,
            Some(&dir.join(format!("child-{site}.log"))),
        )?;
        let mem = Memory::read(Some(child.pid()));
        println!(
            "  run {}: READY after {:.1} ms (in the daemon: {:.1} ms){}; store::open {:.1} ms, store::load {:.1} ms ({} calls loaded); RSS {:.1} MiB",
            i + 1, child.ready_ms_outside, child.ready_ms_inside,
            if cold { ", cold cache" } else { "" },
            open_ms, load_ms, loaded.calls.len(), mem.rss_mib
        );
        let republished = child.wait_log(REPUBLISHED, Duration::from_secs(args.republish_wait_s));
        let after = Memory::read(Some(child.pid()));
        println!(
            "         retained state republished {}; RSS then {:.1} MiB, peak {:.1} MiB",
            republished.map_or(
                format!("not within {} s", args.republish_wait_s),
                |d| format!("after {:.0} ms", d.as_secs_f64() * 1e3)
            ),
            after.rss_mib,
            after.peak_rss_mib
        );
        runs.push(
            json!({"ready_ms": child.ready_ms_outside, "ready_ms_in_daemon": child.ready_ms_inside,
                         "cold_cache": cold, "store_open_ms": open_ms, "store_load_ms": load_ms,
                         "calls_loaded": loaded.calls.len(), "rss_at_ready_mib": mem.rss_mib,
                         "republished_ms": republished.map(|d| d.as_secs_f64() * 1e3),
                         "rss_after_republish_mib": after.rss_mib, "peak_rss_mib": after.peak_rss_mib}),
        );
        child.stop()?;
    }
    let med = stats::median(
        &runs
            .iter()
            .filter_map(|r| r["ready_ms"].as_f64())
            .collect::<Vec<_>>(),
    );
    println!("  median start to READY: {med:.1} ms");
    Ok(json!({"database": g, "plans": plans, "runs": runs, "median_ready_ms": med}))
}
