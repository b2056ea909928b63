//! `ddstor call METHOD 'JSON-ARGS'`: one xapi storage call, JSON in and out; and the connection
//! options shared by `ddstor call`, `ddstor sr …` and `ddstor vdi …`.

use crate::client::{AgentClient, ClientError, Route};
use anyhow::Context;
use clap::Args;
use interface::{xapi, Call, Response, StorageError};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use transport::vchan::sim::SimXen;
use transport::vchan::{Backend, BackendKind};
use xs_registry::client::Xs;

/// The default unix socket of the agent (also `$DDSTOR_SOCKET`).
pub const DEFAULT_SOCKET: &str = "/run/ddstor/agent.sock";

/// Exit status when the agent answered with a storage error.
pub const EXIT_STORAGE_ERROR: i32 = 1;
/// Exit status when the agent could not be reached or broke the connection.
pub const EXIT_TRANSPORT_ERROR: i32 = 2;

/// Xen backend of a vchan client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientXen {
    /// Real Xen (`/dev/xen/gntdev`, `/dev/xen/evtchn`).
    Xen,
    /// Simulated Xen in `--xen-sim-dir` / `$XEN_SIM_DIR`.
    Sim,
}

/// A vchan address: the agent's domain and its vchan port (`DOMID:PORT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VchanAddr {
    /// The agent's domain.
    pub domid: u16,
    /// Its vchan port name.
    pub port: String,
}

impl std::str::FromStr for VchanAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (d, p) = s
            .split_once(':')
            .ok_or_else(|| format!("expected DOMID:PORT (e.g. 1:ddstor), got {s:?}"))?;
        let domid = d
            .parse()
            .map_err(|_| format!("domain id {d:?} is not a number 0-65535"))?;
        if p.is_empty()
            || !p
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
        {
            return Err(format!(
                "vchan port {p:?} must be a non-empty name of letters, digits, '-' or '_'"
            ));
        }
        Ok(VchanAddr {
            domid,
            port: p.to_string(),
        })
    }
}

/// How to reach the agent: `--vchan DOMID:PORT`, else `--lookup-sr SR-UUID` (xenstore), else
/// `--unix PATH` (default /run/ddstor/agent.sock).
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// The agent's unix socket [default: /run/ddstor/agent.sock].
    #[arg(long, env = "DDSTOR_SOCKET", value_name = "PATH")]
    pub unix: Option<PathBuf>,
    /// Reach the agent over vchan: its domain id and vchan port, e.g. `1:ddstor`.
    #[arg(long, value_name = "DOMID:PORT")]
    pub vchan: Option<VchanAddr>,
    /// Find the agent serving this SR in the xenstore registry, then connect by vchan (or by
    /// its unix socket when the agent runs in this client's own domain and the socket exists
    /// here).
    #[arg(long = "lookup-sr", value_name = "SR-UUID")]
    pub lookup_sr: Option<String>,
    /// This client's own domain id (the vchan's client end).
    #[arg(
        long = "domid",
        env = "DDSTOR_DOMID",
        value_name = "N",
        default_value_t = 0
    )]
    pub domid: u16,
    /// Xen backend for vchan [default: xen when /dev/xen/gntdev exists, else sim].
    #[arg(long, env = "DDSTOR_XEN", value_enum)]
    pub xen: Option<ClientXen>,
    /// Simulated Xen directory (`--xen sim`).
    #[arg(long, env = "XEN_SIM_DIR", value_name = "DIR")]
    pub xen_sim_dir: Option<PathBuf>,
    /// xenstored socket (vchan rendezvous and SR lookup) [default: /run/xenstored/socket].
    #[arg(long, env = "XENSTORED_PATH", value_name = "PATH")]
    pub xenstore_socket: Option<PathBuf>,
    /// Seconds to keep trying to connect over vchan (the agent serves one vchan per client
    /// domain at a time).
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub connect_timeout: u64,
}

fn non_empty(p: &Option<PathBuf>) -> Option<&PathBuf> {
    p.as_ref().filter(|p| !p.as_os_str().is_empty())
}

impl ConnectArgs {
    /// Connects to the agent.
    pub async fn connect(&self) -> Result<AgentClient, ClientError> {
        if self.vchan.is_some() && self.lookup_sr.is_some() {
            return Err(ClientError::Lookup(
                "give either --vchan or --lookup-sr/--sr, not both".into(),
            ));
        }
        if let Some(v) = &self.vchan {
            let xs = self.xenstore().await?;
            return self.connect_vchan(&xs, v.domid, &v.port).await;
        }
        if let Some(sr) = &self.lookup_sr {
            let xs = self.xenstore().await?;
            let route = crate::client::lookup_sr(&xs, sr, self.domid).await?;
            tracing::info!(sr = %sr, route = %route, "agent found in xenstore");
            return match route {
                Route::Unix(p) => AgentClient::connect_unix(p).await,
                Route::Vchan { domid, port } => self.connect_vchan(&xs, domid, &port).await,
            };
        }
        AgentClient::connect_unix(self.unix_path()).await
    }

    fn unix_path(&self) -> PathBuf {
        non_empty(&self.unix)
            .cloned()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
    }

    async fn xenstore(&self) -> Result<Xs, ClientError> {
        let sock = non_empty(&self.xenstore_socket)
            .cloned()
            .unwrap_or_else(|| PathBuf::from("/run/xenstored/socket"));
        Xs::connect(&sock).await.map_err(|e| {
            ClientError::Lookup(format!(
                "connecting to xenstore at {} ({e}); pass --xenstore-socket or XENSTORED_PATH",
                sock.display()
            ))
        })
    }

    /// The vchan backend, and the simulated Xen directory when it is the sim one.
    fn backend(&self) -> Result<(Arc<dyn Backend>, Option<PathBuf>), ClientError> {
        let kind = self.xen.unwrap_or_else(|| {
            if std::path::Path::new("/dev/xen/gntdev").exists() {
                ClientXen::Xen
            } else {
                ClientXen::Sim
            }
        });
        Ok(match kind {
            ClientXen::Xen => (transport::vchan::open_backend(BackendKind::Xen)?, None),
            ClientXen::Sim => {
                let dir = non_empty(&self.xen_sim_dir).ok_or_else(|| {
                    ClientError::Lookup(
                        "vchan over simulated Xen needs --xen-sim-dir or XEN_SIM_DIR \
                         (or --xen xen on a Xen host)"
                            .into(),
                    )
                })?;
                (Arc::new(SimXen::new(dir)?), Some(dir.clone()))
            }
        })
    }

    async fn connect_vchan(
        &self,
        xs: &Xs,
        domid: u16,
        port: &str,
    ) -> Result<AgentClient, ClientError> {
        let (backend, sim_dir) = self.backend()?;
        // Clients of this domain take turns on the one vchan: a lock file they all see (the
        // simulated Xen directory, or /run/ddstor on a Xen host).
        let lock_dir = sim_dir.unwrap_or_else(|| PathBuf::from("/run/ddstor"));
        let lock = std::fs::create_dir_all(&lock_dir)
            .is_ok()
            .then(|| lock_dir.join(format!(".vchan-{domid}-{}-{port}.lock", self.domid)));
        AgentClient::connect_vchan(
            xs,
            &*backend,
            self.domid,
            domid,
            port,
            Duration::from_secs(self.connect_timeout),
            lock.as_deref(),
        )
        .await
    }

    /// Where the agent is, for messages.
    pub fn describe(&self) -> String {
        if let Some(v) = &self.vchan {
            format!("vchan {}:{} as domain {}", v.domid, v.port, self.domid)
        } else if let Some(sr) = &self.lookup_sr {
            format!("the agent serving SR {sr} (xenstore lookup)")
        } else {
            format!("unix socket {}", self.unix_path().display())
        }
    }
}

/// Arguments of `ddstor call`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    ddstor call Query.query\n  \
    ddstor call --vchan 1:ddstor --xen sim --xen-sim-dir /tmp/sim Query.query\n  \
    ddstor call --sr 0f9c3d2e-1a2b-4c5d-8e9f-0123456789ab SR.stat '{\"sr\":\"0f9c3d2e-1a2b-4c5d-8e9f-0123456789ab\"}'\n  \
    ddstor call SR.create '{\"sr\":\"0f9c3d2e-1a2b-4c5d-8e9f-0123456789ab\",\"name_label\":\"local\"}'\n  \
    ddstor call VDI.create '{\"sr\":\"…\",\"vdi_info\":{\"name_label\":\"disk\",\"virtual_size\":1073741824}}'\n\n\
    The result is printed as JSON on stdout (xapi's shape). A storage error is printed as JSON\n\
    {\"error\": [xapi error], \"message\": …} on stderr with exit status 1; a connection failure\n\
    as {\"error\": \"transport\", \"message\": …} with exit status 2.")]
pub struct CallArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Find the agent serving this SR through xenstore (the same as --lookup-sr).
    #[arg(long = "sr", value_name = "SR-UUID", conflicts_with = "lookup_sr")]
    sr: Option<String>,
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
pub fn run(mut a: CallArgs) -> anyhow::Result<()> {
    if let Some(sr) = a.sr.take() {
        a.connect.lookup_sr = Some(sr);
    }
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
        // Drop the runtime (and with it the connection) before any exit: a vchan peer must see
        // the ring closed, or the agent keeps this domain's one vchan.
        drop(rt);
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
    // Drop the runtime (and with it the connection) before any exit: a vchan peer must see
    // the ring closed, or the agent keeps this domain's one vchan.
    drop(rt);
    match result {
        Ok(r) => print_response(&r),
        Err(e) => exit_client_error(&e, &target),
    }
}
