//! `ddstor serve`'s configuration: a TOML file (every key optional, defaults that work) and
//! command-line flags that override it. [`EXAMPLE`] is the documented file with every key at
//! its default (`ddstor serve --print-config` prints it).

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The documented configuration file, every key at its default value.
pub const EXAMPLE: &str = r#"# ddstor serve — configuration file (TOML). Every key is optional; the values below are the
# defaults. Command-line flags override the file.

# Where SRs are created by default (<data_dir>/<sr-uuid>/) and where the agent remembers SRs
# created elsewhere. Flag: --data-dir.
data_dir = "/var/lib/ddstor"

# Extra directories SR.attach searches when device_config has no `path`: each is an SR itself
# or holds SRs as <uuid>/ sub-directories. Flag: --sr-root (repeatable).
sr_roots = []

# This agent's own Xen domain id (the driver domain). Flag: --domid.
domid = 0

# Xen backend for vchan: "xen" (/dev/xen/* devices), "sim" (simulated grants/event channels in
# sim_dir, no hypervisor) or "none" (no vchan; unix socket only). Flag: --xen.
xen = "none"

# Directory of the simulated Xen ("sim" backend); empty = $XEN_SIM_DIR. Flag: --xen-sim-dir.
xen_sim_dir = ""

# Seconds that in-flight calls get to finish after SIGTERM/SIGINT before the agent exits anyway.
shutdown_grace_secs = 30

[unix]
# Unix socket served (mode 0600 in a 0700 directory); empty = no unix socket. Flag: --unix.
path = "/run/ddstor/agent.sock"
# Peer uids allowed to connect; empty = root and the agent's own uid. Flag: --allow-uid.
allow_uids = []

[vchan]
# vchan port name (the rendezvous key /local/domain/<domid>/data/vchan/<client>/<port>/).
# Flag: --vchan-port.
port = "ddstor"
# Client domains served over vchan, one listener each (dom0 = 0). Flag: --vchan-client.
clients = [0]

[xenstore]
# Register the agent in xenstore (/local/domain/<domid>/data/ddstor/). Flag: --xenstore on|off.
enabled = false
# xenstored's unix socket, or a xenbus device (a char device, e.g. /dev/xen/xenbus in a guest);
# empty = $XENSTORED_PATH, else /run/xenstored/socket if it exists, else /dev/xen/xenbus.
# Flag: --xenstore-socket.
socket = ""
# Seconds between heartbeats (load refresh) in xenstore.
heartbeat_secs = 5

[nbd]
# Unix socket of the NBD datapath (VDI.attach returns nbd:unix:<socket>:exportname=<sr>/<vdi>);
# empty = <data_dir>/nbd.sock. Flag: --nbd-socket.
socket = ""
# Also serve NBD on this TCP address, e.g. "127.0.0.1:10809" (loopback only: NBD has no
# authentication); empty = no TCP. Flag: --nbd-tcp.
tcp = ""
# Connect each attached VDI's export to a free kernel nbd device (/dev/nbdN) and return it to
# xapi as a BlockDevice (for blkback) besides the NBD URI: true, false, or "auto" (where the
# nbd module is loaded, i.e. /dev/nbd0 exists; otherwise one info line and the NBD URI only).
kernel_devices = "auto"
# Seconds after which the kernel times a request on such a device out (NBD_SET_TIMEOUT);
# 0 = never. A timed-out request shuts the device's connection down for good (every later
# request fails until the VDI is detached and attached again), and the export legitimately
# holds requests while it is paused: from VDI.attach until VDI.activate (the kernel's partition
# scan and udev/blkid probes of a new device wait there too), around a snapshot or clone, after
# VDI.deactivate. Set a value only if it exceeds the longest such pause.
kernel_timeout_secs = 0
# Largest read (bytes) answered on a connection's own task when its data is cached (page
# cache, cached VHD bitmaps); bigger or uncached reads go to the blocking pool. 0 = never.
inline_read_max = 65536
# Smallest read (bytes) sent zero-copy (file pages spliced through a pipe into the socket);
# smaller reads are copied, which costs less than the pipe's system calls. 0 = never.
zero_copy_min = 32768
# Most NBD connections open at once on each listener (unix socket, TCP); one more is accepted
# and closed at once, with a rate-limited warning. At least 1.
max_connections = 1024

[gc]
# Background garbage collection and coalescing of every attached SR's VHD chains. `ddstor sr gc`
# also runs a round on demand.
enabled = true
# Seconds between rounds (a round also starts after VDI.compose, and on SR.gc).
interval_secs = 30
# A snapshot or clone of a VDI whose chain has this many layers or more first kicks a round and
# waits (at most 120 s) until the chain is shorter, or a round could not shorten it; chains so
# stay short even under a stream of snapshots. 0 = never wait.
snapshot_wait_depth = 16
# Highest copy rate of background merges, bytes per second (0 = unlimited), so GC does not
# starve guest I/O. The final switch of a leaf merge is never rate-limited (it runs paused).
rate_limit = 67108864
# Merge VDI leaves into their single-child hidden parents while attached (short export pause).
leaf_merge = true
# Leaves holding more than this many bytes are frozen first, so the pause covers only what
# the guest writes during the merge.
freeze_above = 4194304

[rpc]
# Largest frame (bytes) accepted or sent on a connection.
max_frame = 16777216
# Calls handled concurrently on one connection before the agent stops reading it.
max_in_flight = 1024
"#;

/// Xen backend of the vchan transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum XenBackend {
    /// Real Xen: `/dev/xen/gntalloc`, `gntdev`, `evtchn`.
    Xen,
    /// Simulated Xen in a directory (no hypervisor; tests and CI).
    Sim,
    /// No vchan at all.
    None,
}

/// `[unix]`: the unix socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UnixConfig {
    /// Socket path; empty disables the unix listener.
    pub path: PathBuf,
    /// Allowed peer uids; empty = root and the agent's own uid.
    pub allow_uids: Vec<u32>,
}

impl Default for UnixConfig {
    fn default() -> Self {
        UnixConfig {
            path: PathBuf::from("/run/ddstor/agent.sock"),
            allow_uids: Vec::new(),
        }
    }
}

/// `[vchan]`: vchan listeners.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VchanConfig {
    /// The vchan port name.
    pub port: String,
    /// Client domains served.
    pub clients: Vec<u16>,
}

impl Default for VchanConfig {
    fn default() -> Self {
        VchanConfig {
            port: "ddstor".to_string(),
            clients: vec![0],
        }
    }
}

/// `[xenstore]`: registration in xenstore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct XenstoreConfig {
    /// Register at all.
    pub enabled: bool,
    /// xenstored socket or xenbus device; empty = `$XENSTORED_PATH`, else `/run/xenstored/socket`
    /// if it exists, else `/dev/xen/xenbus`.
    pub socket: PathBuf,
    /// Seconds between heartbeats.
    pub heartbeat_secs: u64,
}

impl Default for XenstoreConfig {
    fn default() -> Self {
        XenstoreConfig {
            enabled: false,
            socket: PathBuf::new(),
            heartbeat_secs: 5,
        }
    }
}

impl XenstoreConfig {
    /// The xenstored socket (or xenbus device) to use: the configured one, else `$XENSTORED_PATH`,
    /// else `/run/xenstored/socket` if it exists, else `/dev/xen/xenbus` (inside a guest).
    pub fn socket_path(&self) -> PathBuf {
        if !self.socket.as_os_str().is_empty() {
            return self.socket.clone();
        }
        // `$XENSTORED_PATH`, else /run/xenstored/socket if present, else /dev/xen/xenbus (a guest).
        xs_registry::client::Endpoint::from_env()
            .path()
            .to_path_buf()
    }
}

/// `[nbd]`: the NBD datapath's listeners and the server's tuning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NbdConfig {
    /// Unix socket; empty = `<data_dir>/nbd.sock`.
    pub socket: PathBuf,
    /// Optional loopback TCP address (`host:port`); empty = none.
    pub tcp: String,
    /// Kernel nbd devices for blkback: `true`, `false` or `"auto"` (default).
    pub kernel_devices: nbd::kernel::KernelDevices,
    /// `NBD_SET_TIMEOUT` of those devices in seconds; 0 (default) = never time out.
    pub kernel_timeout_secs: u64,
    /// [`nbd::ServerOptions::inline_read_max`].
    pub inline_read_max: u64,
    /// [`nbd::ServerOptions::zero_copy_min`].
    pub zero_copy_min: u64,
    /// [`nbd::ServerOptions::max_connections`].
    pub max_connections: usize,
}

impl Default for NbdConfig {
    fn default() -> Self {
        let o = nbd::ServerOptions::default();
        NbdConfig {
            socket: PathBuf::new(),
            tcp: String::new(),
            kernel_devices: Default::default(),
            kernel_timeout_secs: 0,
            inline_read_max: o.inline_read_max,
            zero_copy_min: o.zero_copy_min,
            max_connections: o.max_connections,
        }
    }
}

impl NbdConfig {
    /// The NBD server's tuning.
    pub fn server_options(&self) -> nbd::ServerOptions {
        nbd::ServerOptions {
            inline_read_max: self.inline_read_max,
            zero_copy_min: self.zero_copy_min,
            max_connections: self.max_connections,
        }
    }
}

/// `[gc]`: the background GC (see `differencing::online`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GcConfig {
    /// Run the background GC (on by default); `ddstor sr gc` also runs a round on demand.
    pub enabled: bool,
    /// Seconds between rounds.
    pub interval_secs: u64,
    /// Chain depth from which a snapshot or clone waits for a round (0 = never).
    pub snapshot_wait_depth: usize,
    /// Bytes per second of background merges (0 = unlimited).
    pub rate_limit: u64,
    /// Merge leaves into their single-child parents online.
    pub leaf_merge: bool,
    /// Leaves above this many bytes are frozen before merging.
    pub freeze_above: u64,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            enabled: true,
            interval_secs: 30,
            snapshot_wait_depth: crate::differencing::online::DEFAULT_SNAPSHOT_WAIT_DEPTH,
            rate_limit: 64 << 20,
            leaf_merge: true,
            freeze_above: 4 << 20,
        }
    }
}

impl GcConfig {
    /// The options of a GC round.
    pub fn online_options(&self) -> crate::differencing::online::OnlineOptions {
        crate::differencing::online::OnlineOptions {
            gc: crate::differencing::gc::GcOptions {
                rate_limit: (self.rate_limit > 0).then_some(self.rate_limit),
                ..Default::default()
            },
            leaf_merge: self.leaf_merge,
            freeze_above: self.freeze_above,
        }
    }
}

/// `[rpc]`: connection limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RpcConfig {
    /// Largest frame in bytes.
    pub max_frame: u32,
    /// Concurrent calls per connection.
    pub max_in_flight: usize,
}

impl Default for RpcConfig {
    fn default() -> Self {
        RpcConfig {
            max_frame: transport::MAX_FRAME_DEFAULT,
            max_in_flight: 1024,
        }
    }
}

/// The whole configuration of `ddstor serve`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Default home of SRs.
    pub data_dir: PathBuf,
    /// Extra directories searched by `SR.attach`.
    pub sr_roots: Vec<PathBuf>,
    /// Own domain id.
    pub domid: u16,
    /// Xen backend for vchan.
    pub xen: XenBackend,
    /// Simulated Xen directory (`sim` backend); empty = `$XEN_SIM_DIR`.
    pub xen_sim_dir: PathBuf,
    /// Grace period for in-flight calls at shutdown.
    pub shutdown_grace_secs: u64,
    /// Unix socket.
    pub unix: UnixConfig,
    /// vchan listeners.
    pub vchan: VchanConfig,
    /// xenstore registration.
    pub xenstore: XenstoreConfig,
    /// Connection limits.
    pub rpc: RpcConfig,
    /// NBD datapath listeners.
    pub nbd: NbdConfig,
    /// Background GC.
    pub gc: GcConfig,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            data_dir: PathBuf::from("/var/lib/ddstor"),
            sr_roots: Vec::new(),
            domid: 0,
            xen: XenBackend::None,
            xen_sim_dir: PathBuf::new(),
            shutdown_grace_secs: 30,
            unix: UnixConfig::default(),
            vchan: VchanConfig::default(),
            xenstore: XenstoreConfig::default(),
            rpc: RpcConfig::default(),
            nbd: NbdConfig::default(),
            gc: GcConfig::default(),
        }
    }
}

/// A configuration problem: which file or key, and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config file {path}: {message} (see `ddstor serve --print-config`)")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the key and line.
        message: String,
    },
    /// The settings contradict each other.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl AgentConfig {
    /// Parses a TOML document (`path` only names it in errors).
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Reads and parses a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// The simulated-Xen directory: the configured one, else `$XEN_SIM_DIR`.
    pub fn sim_dir(&self) -> Option<PathBuf> {
        if !self.xen_sim_dir.as_os_str().is_empty() {
            return Some(self.xen_sim_dir.clone());
        }
        std::env::var_os("XEN_SIM_DIR")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
    }

    /// The NBD datapath's unix socket: `nbd.socket`, else `<data_dir>/nbd.sock`.
    pub fn nbd_socket(&self) -> PathBuf {
        if self.nbd.socket.as_os_str().is_empty() {
            self.data_dir.join("nbd.sock")
        } else {
            self.nbd.socket.clone()
        }
    }

    /// The NBD datapath's optional TCP address (refused unless it is a loopback address).
    pub fn nbd_tcp(&self) -> Result<Option<std::net::SocketAddr>, ConfigError> {
        if self.nbd.tcp.is_empty() {
            return Ok(None);
        }
        let a: std::net::SocketAddr = self.nbd.tcp.parse().map_err(|e| {
            ConfigError::Invalid(format!(
                "nbd.tcp {:?} is not an address like 127.0.0.1:10809: {e}",
                self.nbd.tcp
            ))
        })?;
        if !a.ip().is_loopback() {
            return Err(ConfigError::Invalid(format!(
                "nbd.tcp {a} is not a loopback address: NBD has no authentication, so the \
                 datapath is only served on 127.0.0.1 or ::1"
            )));
        }
        Ok(Some(a))
    }

    /// Checks that the settings make sense together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.unix.path.as_os_str().is_empty() && self.xen == XenBackend::None {
            return Err(ConfigError::Invalid(
                "nothing to serve on: set unix.path (--unix) or a Xen backend (--xen sim|xen)"
                    .into(),
            ));
        }
        if self.xen == XenBackend::Sim && self.sim_dir().is_none() {
            return Err(ConfigError::Invalid(
                "xen = \"sim\" needs xen_sim_dir (--xen-sim-dir) or $XEN_SIM_DIR".into(),
            ));
        }
        if self.xen != XenBackend::None && self.vchan.clients.is_empty() {
            return Err(ConfigError::Invalid(
                "vchan needs at least one client domain (vchan.clients, --vchan-client)".into(),
            ));
        }
        if self.xen != XenBackend::None
            && (self.vchan.port.is_empty()
                || !self
                    .vchan
                    .port
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c)))
        {
            return Err(ConfigError::Invalid(format!(
                "vchan.port {:?} must be a non-empty name of letters, digits, '-' or '_'",
                self.vchan.port
            )));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid("data_dir is empty".into()));
        }
        self.nbd_tcp()?;
        if self.nbd_socket().as_os_str().len() > 107 {
            return Err(ConfigError::Invalid(format!(
                "the NBD socket path {} is longer than a unix socket path may be (107 bytes); \
                 set nbd.socket (--nbd-socket) to a shorter path",
                self.nbd_socket().display()
            )));
        }
        if self.nbd.max_connections == 0 {
            return Err(ConfigError::Invalid(
                "nbd.max_connections must be at least 1".into(),
            ));
        }
        if self.rpc.max_frame < 4096 || self.rpc.max_in_flight == 0 {
            return Err(ConfigError::Invalid(
                "rpc.max_frame must be at least 4096 and rpc.max_in_flight at least 1".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_example_is_exactly_the_defaults() {
        let c = AgentConfig::from_toml(EXAMPLE, Path::new("EXAMPLE")).unwrap();
        assert_eq!(c, AgentConfig::default());
    }

    #[test]
    fn empty_file_gives_defaults_and_partial_tables_merge() {
        let c = AgentConfig::from_toml("", Path::new("x")).unwrap();
        assert_eq!(c, AgentConfig::default());
        let c = AgentConfig::from_toml("[vchan]\nport = \"p9\"\n", Path::new("x")).unwrap();
        assert_eq!(c.vchan.port, "p9");
        assert_eq!(c.vchan.clients, vec![0]);
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let e = AgentConfig::from_toml("[unix]\npaht = \"/x\"\n", Path::new("a.toml")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("paht") && msg.contains("a.toml"), "{msg}");
    }

    #[test]
    fn validate_refuses_nothing_to_serve_and_sim_without_dir() {
        let mut c = AgentConfig::default();
        c.unix.path = PathBuf::new();
        assert!(c.validate().is_err());
        let mut c = AgentConfig {
            xen: XenBackend::Sim,
            xen_sim_dir: PathBuf::from("/tmp/sim"),
            ..AgentConfig::default()
        };
        assert!(c.validate().is_ok());
        c.vchan.clients.clear();
        assert!(c.validate().is_err());
    }

    #[test]
    fn nbd_tuning_keys_reach_the_server_options_and_max_connections_must_be_positive() {
        let c = AgentConfig::from_toml(
            "[nbd]\ninline_read_max = 0\nzero_copy_min = 1\nmax_connections = 7\n",
            Path::new("x"),
        )
        .unwrap();
        let o = c.nbd.server_options();
        assert_eq!(
            (o.inline_read_max, o.zero_copy_min, o.max_connections),
            (0, 1, 7)
        );
        assert!(c.validate().is_ok());
        let mut c = AgentConfig::default();
        c.nbd.max_connections = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("max_connections"));
    }

    #[test]
    fn nbd_socket_defaults_to_the_data_dir_and_tcp_must_be_loopback() {
        let mut c = AgentConfig::default();
        assert_eq!(c.nbd_socket(), PathBuf::from("/var/lib/ddstor/nbd.sock"));
        c.nbd.socket = PathBuf::from("/run/x/nbd.sock");
        assert_eq!(c.nbd_socket(), PathBuf::from("/run/x/nbd.sock"));
        c.nbd.tcp = "127.0.0.1:10809".into();
        assert!(c.validate().is_ok());
        c.nbd.tcp = "0.0.0.0:10809".into();
        assert!(c.validate().unwrap_err().to_string().contains("loopback"));
        c.nbd.tcp = "nonsense".into();
        assert!(c.validate().is_err());
    }
}
