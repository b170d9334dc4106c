//! Measures what a connected handheld costs the broker: starts the `pickup-broker` binary
//! (built next to this example) as a process of its own, connects `N` clients, each
//! subscribed at QoS 1 to its own job topic, sends each `K` messages (enough to cycle
//! through every per-connection queue), and reads the broker process's resident set.
//!
//! `cargo build --release -p pickup-broker && \
//!  cargo run --release -p pickup-broker --example connections -- [N] [K]`
//! (default 2000 clients, 300 messages each).

mod support;

use std::io::Write;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use pickup_protocol::client::BrokerUrl;
use support::{connect, handhelds, publish_jobs, rss_mib, Error};

struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(2000);
    let k: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(300);
    // Room for the clients' sockets, here and (inherited) in the broker.
    let lim = libc::rlimit {
        rlim_cur: 65536,
        rlim_max: 65536,
    };
    // SAFETY: plain system call on a local struct.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };

    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("pickup-broker"))
        .ok_or("no target directory")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let dir = tempfile::tempdir()?;
    let conf = dir.path().join("broker.toml");
    writeln!(
        std::fs::File::create(&conf)?,
        "[broker]\nlisten = \"127.0.0.1:{port}\"\nmax_connections = {}\n",
        n + 100
    )?;
    let broker = Broker(Command::new(&bin).arg("--config").arg(&conf).spawn()?);
    let pid = broker.0.id().to_string();
    let url = BrokerUrl::parse(&format!("127.0.0.1:{port}"))?;
    let t0 = Instant::now();
    let (p, mut pev) = loop {
        match tokio::time::timeout(Duration::from_secs(1), connect(&url, "daemon")).await {
            Ok(Ok(c)) => break c,
            _ if t0.elapsed() < Duration::from_secs(10) => {}
            _ => return Err(format!("{} did not accept connections", bin.display()).into()),
        }
    };
    let idle = rss_mib(&pid);

    let (clients, mut done_rx) = handhelds(&url, n, k).await?;
    let connected = rss_mib(&pid);

    publish_jobs(&p, &mut pev, n, k).await?;
    for _ in 0..n {
        done_rx.recv().await.ok_or("a client stopped")?;
    }
    // The broker frees what was read within a second.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_mib(&pid);
    let per = |a: f64, b: f64| (b - a) * 1024.0 / n as f64;
    println!("broker process: idle {idle:.1} MiB");
    println!(
        "  {n} clients connected and subscribed: {connected:.1} MiB ({:.1} KiB each)",
        per(idle, connected)
    );
    println!(
        "  after {k} messages to each, all read: {after:.1} MiB ({:.1} KiB each)",
        per(idle, after)
    );
    for c in clients {
        c.abort();
    }
    drop(broker);
    Ok(())
}
