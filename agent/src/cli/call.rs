//! `ddstor call METHOD 'JSON-ARGS'`: one xapi storage call, JSON in and out; and the connection
//! options shared by `ddstor call`, `ddstor sr …` and `ddstor vdi …`.

use crate::client::{AgentClient, ClientError};
use anyhow::Context;
use clap::Args;
use interface::{xapi, Call, Response, StorageError};
use std::io::{Read, Write};
use std::path::PathBuf;

/// The default unix socket of the agent (also `$DDSTOR_SOCKET`).
pub const DEFAULT_SOCKET: &str = "/run/ddstor/agent.sock";

/// Exit status when the agent answered with a storage error.
pub const EXIT_STORAGE_ERROR: i32 = 1;
/// Exit status when the agent could not be reached or broke the connection.
pub const EXIT_TRANSPORT_ERROR: i32 = 2;

/// How to reach the agent.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// The agent's unix socket.
    #[arg(long, env = "DDSTOR_SOCKET", default_value = DEFAULT_SOCKET, value_name = "PATH")]
    pub unix: PathBuf,
}

impl ConnectArgs {
    /// Connects to the agent.
    pub async fn connect(&self) -> Result<AgentClient, ClientError> {
        AgentClient::connect_unix(&self.unix).await
    }

    /// Where the agent is, for messages.
    pub fn describe(&self) -> String {
        format!("unix socket {}", self.unix.display())
    }
}

/// Arguments of `ddstor call`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    ddstor call Query.query\n  \
    ddstor call SR.create '{\"sr\":\"0f9c3d2e-1a2b-4c5d-8e9f-0123456789ab\",\"name_label\":\"local\"}'\n  \
    ddstor call VDI.create '{\"sr\":\"…\",\"vdi_info\":{\"name_label\":\"disk\",\"virtual_size\":1073741824}}'\n\n\
    The result is printed as JSON on stdout (xapi's shape). A storage error is printed as JSON\n\
    {\"error\": [xapi error], \"message\": …} on stderr with exit status 1; a connection failure\n\
    as {\"error\": \"transport\", \"message\": …} with exit status 2.")]
pub struct CallArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// The method, as xapi names it (e.g. `VDI.create`); `ddstor call --list` lists them.
    #[arg(required_unless_present = "list")]
    method: Option<String>,
    /// Parameters: a JSON object with xapi's parameter names (`dbg` optional); `-` reads stdin.
    #[arg(default_value = "{}")]
    args: String,
    /// List the methods the agent serves and exit.
    #[arg(long)]
    list: bool,
    /// Benchmark: send the call N times and print throughput and latency (JSON) instead of
    /// the result.
    #[arg(long, value_name = "N")]
    repeat: Option<u64>,
    /// With --repeat: calls in flight at once on the one connection.
    #[arg(long, value_name = "C", default_value_t = 1, requires = "repeat")]
    concurrency: u64,
}

/// Sends `call` `n` times with `conc` calls in flight; returns the latency stats as JSON.
async fn bench(
    client: &AgentClient,
    call: &Call,
    n: u64,
    conc: u64,
) -> Result<serde_json::Value, ClientError> {
    use std::sync::atomic::{AtomicU64, Ordering};
    let next = AtomicU64::new(0);
    let t0 = std::time::Instant::now();
    let workers = (0..conc.max(1)).map(|_| async {
        let mut lat = Vec::new();
        while next.fetch_add(1, Ordering::Relaxed) < n {
            let t = std::time::Instant::now();
            client.call(call.clone()).await?;
            lat.push(t.elapsed().as_nanos() as u64);
        }
        Ok::<_, ClientError>(lat)
    });
    let mut lat: Vec<u64> = Vec::new();
    for r in futures::future::join_all(workers).await {
        lat.extend(r?);
    }
    let secs = t0.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize] as f64 / 1000.0;
    Ok(serde_json::json!({
        "method": call.method(),
        "calls": lat.len(),
        "concurrency": conc,
        "seconds": secs,
        "calls_per_sec": lat.len() as f64 / secs,
        "p50_us": pct(0.5),
        "p99_us": pct(0.99),
    }))
}

/// Prints a storage error as JSON on stderr and exits with [`EXIT_STORAGE_ERROR`].
pub fn exit_storage_error(e: &StorageError) -> ! {
    let out = serde_json::json!({"error": xapi::error_to_xapi(e), "message": e.to_string()});
    let _ = writeln!(std::io::stderr(), "{out}");
    std::process::exit(EXIT_STORAGE_ERROR)
}

/// Prints any client failure as JSON on stderr and exits non-zero.
pub fn exit_client_error(e: &ClientError, target: &str) -> ! {
    match e {
        ClientError::Storage(s) => exit_storage_error(s),
        other => {
            let out = serde_json::json!({
                "error": "transport",
                "message": format!("{other} ({target}); is `ddstor serve` running there?"),
            });
            let _ = writeln!(std::io::stderr(), "{out}");
            std::process::exit(EXIT_TRANSPORT_ERROR)
        }
    }
}

/// Prints a result in xapi's JSON shape on stdout.
pub fn print_response(r: &Response) -> anyhow::Result<()> {
    let v = xapi::response_to_xapi(r);
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    out.flush()?;
    Ok(())
}

/// A current-thread tokio runtime for one CLI command.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Runs `ddstor call`.
pub fn run(a: CallArgs) -> anyhow::Result<()> {
    if a.list {
        for m in Call::METHODS {
            println!("{m}");
        }
        return Ok(());
    }
    let method = a.method.unwrap_or_default();
    let text = if a.args == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading JSON-ARGS from stdin")?;
        s
    } else {
        a.args.clone()
    };
    let params: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => exit_storage_error(&StorageError::backend(
            interface::codes::BAD_REQUEST,
            vec![method.clone(), format!("JSON-ARGS is not valid JSON: {e}")],
        )),
    };
    let call = match Call::from_json(&method, params) {
        Ok(c) => c,
        Err(e) => exit_storage_error(&e),
    };
    let rt = runtime()?;
    let target = a.connect.describe();
    if let Some(n) = a.repeat {
        let result = rt.block_on(async {
            let client = a.connect.connect().await?;
            bench(&client, &call, n.max(1), a.concurrency).await
        });
        return match result {
            Ok(v) => {
                println!("{v}");
                Ok(())
            }
            Err(e) => exit_client_error(&e, &target),
        };
    }
    let result = rt.block_on(async {
        let client = a.connect.connect().await?;
        client.call(call).await
    });
    match result {
        Ok(r) => print_response(&r),
        Err(e) => exit_client_error(&e, &target),
    }
}
