//! `ddstor vhd …`: offline tools on VHD files and chains, modelled on vhd-util and qemu-img.
//!
//! Chains are opened from their leaf; parents resolve only inside the leaf's own directory, or
//! inside `--root DIR`.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use vhd::{Chain, ChainOptions, CreateOptions, ExtentState};

/// Arguments of `ddstor vhd`.
#[derive(Debug, Args)]
pub struct VhdArgs {
    /// Directory that every member of a chain must resolve inside (symlinks followed).
    /// Default: the directory of the file named on the command line.
    #[arg(long, global = true, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Refuse chains deeper than this many layers.
    #[arg(long, global = true, default_value_t = vhd::DEFAULT_MAX_DEPTH, value_name = "N")]
    max_depth: usize,
    #[command(subcommand)]
    cmd: VhdCommand,
}

/// `ddstor vhd` subcommands.
#[derive(Debug, Subcommand)]
enum VhdCommand {
    /// Create an empty dynamic (sparse) VHD.
    Create {
        /// The new file (must not exist).
        file: PathBuf,
        /// Virtual size: bytes, or with a K/M/G/T suffix (powers of 1024).
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Block size (power of two, 4K..256M; default 2M).
        #[arg(long, value_parser = parse_size)]
        block_size: Option<u64>,
        /// Make a fixed (raw + footer) disk instead of a dynamic one.
        #[arg(long)]
        fixed: bool,
    },
    /// Create CHILD, a new empty differencing disk whose parent is PARENT.
    Snapshot {
        /// The parent (its content is what the child reads until written).
        parent: PathBuf,
        /// The new child (must not exist).
        child: PathBuf,
    },
    /// Print the footer and header fields of a VHD.
    Info {
        /// The VHD.
        file: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Validate every structure (checksums, BAT, bitmaps, locators, parent link); exit 0 only
    /// when all are valid.
    Check {
        /// The VHD.
        file: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the allocation of every block through the chain and which layer holds it.
    Map {
        /// The leaf of the chain.
        file: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Copy bytes of the chain's virtual disk to stdout.
    Read {
        /// The leaf of the chain.
        file: PathBuf,
        /// Byte offset.
        #[arg(long, value_parser = parse_size)]
        offset: u64,
        /// Number of bytes.
        #[arg(long, value_parser = parse_size)]
        length: u64,
    },
    /// Write bytes from a file (or stdin) into FILE (the leaf of its chain) at an offset.
    Write {
        /// The leaf of the chain.
        file: PathBuf,
        /// Byte offset.
        #[arg(long, value_parser = parse_size)]
        offset: u64,
        /// Input file (default: stdin).
        #[arg(long)]
        input: Option<PathBuf>,
    },
    /// Convert a VHD chain to a flat raw file, or a raw file to a dynamic VHD.
    Convert {
        /// Source (VHD leaf, or raw file).
        src: PathBuf,
        /// Destination (must not exist).
        dst: PathBuf,
        /// Output format (default: raw when SRC is a VHD, vhd otherwise).
        #[arg(long, value_enum)]
        to: Option<Format>,
        /// Block size of a VHD output.
        #[arg(long, value_parser = parse_size)]
        block_size: Option<u64>,
    },
    /// Measure read or allocating-write throughput through the chain (like `qemu-img bench`):
    /// COUNT requests of SIZE bytes, one at a time, then a flush for writes.
    Bench {
        /// The leaf of the chain.
        file: PathBuf,
        /// Write instead of read.
        #[arg(long)]
        write: bool,
        /// Request pattern.
        #[arg(long, value_enum, default_value = "seq")]
        pattern: Pattern,
        /// Request size.
        #[arg(long, value_parser = parse_size, default_value = "2M")]
        size: u64,
        /// Number of requests (default: enough to cover the disk once).
        #[arg(long)]
        count: Option<u64>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Merge a differencing disk into its parent (journaled, resumable), like vhd-util coalesce.
    Coalesce(super::vhd_coalesce::CoalesceArgs),
    /// Set or clear blktap's hidden flag (footer byte 85, both copies).
    SetHidden {
        /// The VHD.
        file: PathBuf,
        /// `on` or `off`.
        state: OnOff,
    },
}

/// I/O patterns of `bench`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Pattern {
    /// Consecutive requests.
    Seq,
    /// Uniformly random, request-aligned offsets (fixed seed).
    Rand,
}

/// Output formats of `convert`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// Flat raw image.
    Raw,
    /// Dynamic VHD.
    Vhd,
}

/// `on`/`off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnOff {
    /// Set.
    On,
    /// Clear.
    Off,
}

/// Parses `123`, `4K`, `2M`, `10G`, `1T` (also `KiB`/`MB` spellings; powers of 1024).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (bytes, or a number with K/M/G/T)"))?;
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => {
            return Err(format!(
                "{s:?}: unknown size suffix {suffix:?} (use K, M, G or T)"
            ))
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn root_for(root: &Option<PathBuf>, file: &Path) -> PathBuf {
    root.clone().unwrap_or_else(|| match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    })
}

fn block_size_arg(b: Option<u64>) -> Result<u32> {
    match b {
        None => Ok(vhd::format::DEFAULT_BLOCK_SIZE),
        Some(b) => u32::try_from(b).context("block size is too large"),
    }
}

fn progress(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_message(what.to_string());
    pb
}

/// Runs `ddstor vhd`.
pub fn run(args: VhdArgs) -> Result<()> {
    let open = |file: &Path, writable: bool| -> Result<Chain> {
        let root = root_for(&args.root, file);
        let opts = ChainOptions {
            root,
            max_depth: args.max_depth,
            writable,
        };
        Chain::open(file, &opts).with_context(|| format!("opening the chain of {}", file.display()))
    };
    match &args.cmd {
        VhdCommand::Create {
            file,
            size,
            block_size,
            fixed,
        } => {
            let opts = CreateOptions {
                block_size: block_size_arg(*block_size)?,
                uuid: None,
            };
            let uuid = if *fixed {
                vhd::create_fixed(file, *size, &opts)
            } else {
                vhd::create_dynamic(file, *size, &opts)
            }
            .with_context(|| format!("creating {}", file.display()))?;
            println!("{uuid}");
        }
        VhdCommand::Snapshot { parent, child } => {
            let uuid = vhd::create_differencing(child, parent, &CreateOptions::default())
                .with_context(|| {
                    format!(
                        "creating {} as a child of {}",
                        child.display(),
                        parent.display()
                    )
                })?;
            println!("{uuid}");
        }
        VhdCommand::Info { file, json } => {
            let i = vhd::info(file).with_context(|| format!("reading {}", file.display()))?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&i)?);
            } else {
                println!("path: {}", i.path);
                println!("type: {}", i.disk_type);
                println!("virtual size: {} bytes", i.virtual_size);
                if let Some(b) = i.block_size {
                    println!("block size: {b} bytes");
                }
                println!("uuid: {}", i.uuid);
                println!("hidden: {}", if i.hidden { "on" } else { "off" });
                println!("creator: {}", i.creator);
                println!("file size: {} bytes", i.file_size);
                println!(
                    "allocated blocks: {} of {}",
                    i.allocated_blocks, i.bat_entries
                );
                if i.batmap {
                    println!("batmap: present");
                }
                if let Some(p) = i.parent_uuid {
                    println!("parent uuid: {p}");
                    println!("parent name: {}", i.parent_name.as_deref().unwrap_or(""));
                    for (k, t) in &i.parent_locators {
                        println!("parent locator {k}: {t}");
                    }
                }
            }
        }
        VhdCommand::Check { file, json } => {
            let root = root_for(&args.root, file);
            let r = vhd::check::check_with_root(file, &root)
                .with_context(|| format!("checking {}", file.display()))?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                for p in &r.problems {
                    match p.offset {
                        Some(o) => println!("{}: at byte {o}: {}", file.display(), p.what),
                        None => println!("{}: {}", file.display(), p.what),
                    }
                }
                if r.is_ok() {
                    println!(
                        "{}: ok ({} allocated blocks checked)",
                        file.display(),
                        r.blocks_checked
                    );
                }
            }
            if !r.is_ok() {
                bail!(
                    "{}: check found {} problem(s)",
                    file.display(),
                    r.problems.len()
                );
            }
        }
        VhdCommand::Map { file, json } => map(&open(file, false)?, *json)?,
        VhdCommand::Read {
            file,
            offset,
            length,
        } => {
            let c = open(file, false)?;
            let mut out = std::io::stdout().lock();
            let mut buf = vec![0u8; (4u64 << 20).min(*length) as usize];
            let mut done = 0u64;
            while done < *length {
                let n = (*length - done).min(buf.len() as u64) as usize;
                c.read_at(&mut buf[..n], offset + done).with_context(|| {
                    format!("reading {} at offset {}", file.display(), offset + done)
                })?;
                out.write_all(&buf[..n]).context("writing to stdout")?;
                done += n as u64;
            }
            out.flush().context("writing to stdout")?;
        }
        VhdCommand::Write {
            file,
            offset,
            input,
        } => {
            let c = open(file, true)?;
            let mut src: Box<dyn Read> = match input {
                Some(p) => Box::new(
                    std::fs::File::open(p)
                        .with_context(|| format!("opening input {}", p.display()))?,
                ),
                None => Box::new(std::io::stdin().lock()),
            };
            let mut buf = vec![0u8; 4 << 20];
            let mut pos = *offset;
            loop {
                let n = read_full(&mut src, &mut buf).context("reading the input")?;
                if n == 0 {
                    break;
                }
                c.write_at(&buf[..n], pos).with_context(|| {
                    format!(
                        "writing {} bytes into {} at offset {pos}",
                        n,
                        file.display()
                    )
                })?;
                pos += n as u64;
            }
            c.flush()
                .with_context(|| format!("flushing {}", file.display()))?;
        }
        VhdCommand::Convert {
            src,
            dst,
            to,
            block_size,
        } => {
            let is_vhd = looks_like_vhd(src)?;
            let to = to.unwrap_or(if is_vhd { Format::Raw } else { Format::Vhd });
            match to {
                Format::Raw => {
                    if !is_vhd {
                        bail!(
                            "{}: not a VHD (no footer); --to raw needs a VHD source",
                            src.display()
                        );
                    }
                    to_raw(&open(src, false)?, dst)?
                }
                Format::Vhd => raw_to_vhd(src, dst, block_size_arg(*block_size)?)?,
            }
        }
        VhdCommand::Bench {
            file,
            write,
            pattern,
            size,
            count,
            json,
        } => bench(&open(file, *write)?, *write, *pattern, *size, *count, *json)?,
        VhdCommand::Coalesce(a) => super::vhd_coalesce::run(a, root_for(&args.root, a.child()))?,
        VhdCommand::SetHidden { file, state } => {
            vhd::set_hidden(file, *state == OnOff::On)
                .with_context(|| format!("setting the hidden flag of {}", file.display()))?;
        }
    }
    Ok(())
}

fn bench(
    c: &Chain,
    write: bool,
    pattern: Pattern,
    size: u64,
    count: Option<u64>,
    json: bool,
) -> Result<()> {
    let vs = c.virtual_size();
    if size == 0 || size > vs {
        bail!("request size {size} must be between 1 and the virtual size {vs}");
    }
    let slots = vs / size;
    let count = count.unwrap_or(slots);
    let mut buf = vec![0x5Au8; size as usize];
    // xorshift64*: a fixed, reproducible sequence of offsets.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let t0 = std::time::Instant::now();
    for i in 0..count {
        let slot = match pattern {
            Pattern::Seq => i % slots,
            Pattern::Rand => {
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                x.wrapping_mul(0x2545_F491_4F6C_DD1D) % slots
            }
        };
        let off = slot * size;
        if write {
            c.write_at(&buf, off)
                .with_context(|| format!("writing at offset {off}"))?;
        } else {
            c.read_at(&mut buf, off)
                .with_context(|| format!("reading at offset {off}"))?;
        }
    }
    if write {
        c.flush().context("flushing")?;
    }
    let secs = t0.elapsed().as_secs_f64().max(1e-9);
    let bytes = count * size;
    let mibs = bytes as f64 / secs / (1 << 20) as f64;
    let iops = count as f64 / secs;
    if json {
        println!(
            "{}",
            serde_json::json!({"ops": count, "bytes": bytes, "seconds": secs, "mib_per_s": mibs, "iops": iops, "depth": c.depth()})
        );
    } else {
        println!(
            "{} {count} x {size} B ({:?}) through {} layer(s): {secs:.3} s, {mibs:.1} MiB/s, {iops:.0} IOPS",
            if write { "wrote" } else { "read" },
            pattern,
            c.depth()
        );
    }
    Ok(())
}

fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn looks_like_vhd(p: &Path) -> Result<bool> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
    let len = f.metadata()?.len();
    let mut c = [0u8; 8];
    for off in [0, len.saturating_sub(512)] {
        if len >= 512 && f.read_exact_at(&mut c, off).is_ok() && &c == vhd::format::FOOTER_COOKIE {
            return Ok(true);
        }
    }
    Ok(false)
}

fn map(c: &Chain, json: bool) -> Result<()> {
    let bs = c.block_size();
    let size = c.virtual_size();
    let mut blocks = Vec::new();
    let mut b = 0u64;
    while b * bs < size {
        let len = bs.min(size - b * bs);
        let ext = c
            .block_status(b * bs, len)
            .with_context(|| format!("mapping block {b}"))?;
        blocks.push((b, ext));
        b += 1;
    }
    let layer_of = |s: ExtentState| match s {
        ExtentState::Data { layer } => Some(layer),
        ExtentState::Zero => None,
    };
    if json {
        let v = serde_json::json!({
            "virtual_size": size,
            "block_size": bs,
            "layers": c.paths().iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            "blocks": blocks.iter().map(|(b, ext)| serde_json::json!({
                "block": b,
                "extents": ext.iter().map(|e| serde_json::json!({
                    "offset": e.offset,
                    "length": e.length,
                    "layer": layer_of(e.state),
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "virtual size {size} bytes, block size {bs} bytes, {} layer(s):",
        c.depth()
    );
    for (i, p) in c.paths().iter().enumerate() {
        println!("  layer {i}: {}", p.display());
    }
    let mut out = std::io::stdout().lock();
    for (b, ext) in &blocks {
        let desc: Vec<String> = ext
            .iter()
            .map(|e| {
                let who = layer_of(e.state).map_or("zero".to_string(), |l| format!("layer {l}"));
                if ext.len() == 1 {
                    who
                } else {
                    format!("{}+{}: {who}", e.offset - b * bs, e.length)
                }
            })
            .collect();
        writeln!(out, "block {b} @{}: {}", b * bs, desc.join(", "))?;
    }
    Ok(())
}

fn to_raw(c: &Chain, dst: &Path) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .with_context(|| format!("creating {} (it must not exist)", dst.display()))?;
    let size = c.virtual_size();
    f.set_len(size)
        .with_context(|| format!("sizing {}", dst.display()))?;
    let pb = progress(size, "convert");
    let chunk = c.block_size().max(1 << 20);
    let mut buf = vec![0u8; chunk as usize];
    let mut pos = 0;
    while pos < size {
        let n = chunk.min(size - pos);
        let ext = c.block_status(pos, n)?;
        for e in ext.iter().filter(|e| e.state != ExtentState::Zero) {
            let b = &mut buf[..e.length as usize];
            c.read_at(b, e.offset)
                .with_context(|| format!("reading offset {}", e.offset))?;
            f.write_all_at(b, e.offset)
                .with_context(|| format!("writing {} at offset {}", dst.display(), e.offset))?;
        }
        pos += n;
        pb.set_position(pos);
    }
    f.sync_all()
        .with_context(|| format!("syncing {}", dst.display()))?;
    pb.finish_and_clear();
    Ok(())
}

fn raw_to_vhd(src: &Path, dst: &Path, block_size: u32) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let len = f.metadata()?.len();
    if len == 0 {
        bail!("{}: empty file, nothing to convert", src.display());
    }
    vhd::create_dynamic(
        dst,
        len,
        &CreateOptions {
            block_size,
            uuid: None,
        },
    )
    .with_context(|| format!("creating {}", dst.display()))?;
    let dir = root_for(&None, dst);
    let c = Chain::open(dst, &ChainOptions::new(dir).writable(true))
        .with_context(|| format!("opening {}", dst.display()))?;
    let pb = progress(len, "convert");
    let bs = block_size as u64;
    let mut buf = vec![0u8; bs as usize];
    let mut pos = 0;
    while pos < len {
        let n = bs.min(len - pos) as usize;
        f.read_exact_at(&mut buf[..n], pos)
            .with_context(|| format!("reading {} at offset {pos}", src.display()))?;
        // Keep the result sparse: all-zero blocks stay unallocated.
        if buf[..n].iter().any(|&b| b != 0) {
            c.write_at(&buf[..n], pos)
                .with_context(|| format!("writing {} at offset {pos}", dst.display()))?;
        }
        pos += n as u64;
        pb.set_position(pos);
    }
    c.flush()
        .with_context(|| format!("flushing {}", dst.display()))?;
    pb.finish_and_clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_binary_suffixes_and_reject_garbage() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("2M").unwrap(), 2 << 20);
        assert_eq!(parse_size("10GiB").unwrap(), 10 << 30);
        assert_eq!(parse_size("1t").unwrap(), 1 << 40);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("abc").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
