//! The command line: argument parsing, logging set-up, dispatch, and error reporting.
//!
//! Every command returns `Result<ExitCode, Error>`; an error is printed once, as the whole
//! cause chain on one line plus a hint where one helps, and the process exits non-zero.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};

use crate::error::Error;
use crate::fusefs::{self, MountOptions};
use crate::image::{self, OpenOptions};
use crate::inspect::InspectReport;
use crate::source::Platform;

#[derive(Debug, Parser)]
#[command(
    name = "fledge",
    version,
    about = "Turn Docker/OCI container images into bootable microVM root filesystem images",
    propagate_version = true
)]
struct Cli {
    /// More output (-v: steps and decisions, -vv: debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Print only errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build a root filesystem image and its plugin manifest from fledge.toml.
    Build(crate::build::BuildArgs),
    /// Check what this host can do and which backend `build` will choose.
    Doctor(crate::doctor::DoctorArgs),
    /// Mount an image's merged layers read-only through FUSE (foreground until unmounted).
    Mount(MountArgs),
    /// Show an image's manifest digest, platform, config and layers.
    Inspect(InspectArgs),
    /// Fetch an image's layers into the cache (download, verify, decompress) without
    /// mounting or building anything.
    Pull(PullArgs),
    /// Manage the layer and blob cache.
    Cache(CacheArgs),
    /// Print the version.
    Version,
}

/// Options shared by every command that reads an image.
#[derive(Debug, Args)]
pub struct ImageArgs {
    /// Platform to select from a multi-platform index, as os/arch[/variant] (default: this
    /// host's).
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    pub platform: Option<String>,
    /// Layer cache directory (default: $FLEDGE_CACHE_DIR, else $XDG_CACHE_HOME/fledge, else
    /// ~/.cache/fledge).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Use a temporary cache, deleted when the command ends.
    #[arg(long, conflicts_with = "cache_dir")]
    pub no_cache: bool,
    /// Reach this registry (host[:port]) over plain HTTP; repeatable. Loopback registries
    /// always are. Also $FLEDGE_INSECURE_REGISTRIES (comma-separated).
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    pub insecure_registries: Vec<String>,
    /// Extra CA certificates (PEM) to trust for registries (also $FLEDGE_REGISTRY_CA).
    #[arg(long, value_name = "FILE")]
    pub registry_ca: Option<PathBuf>,
}

impl ImageArgs {
    pub fn open_options(&self) -> Result<OpenOptions, Error> {
        let platform = match &self.platform {
            Some(p) => Platform::parse(p)?,
            None => Platform::host(),
        };
        let (cache_dir, temp_cache) = if self.no_cache {
            let base = std::env::temp_dir();
            let tmp = tempfile::Builder::new()
                .prefix("fledge-cache-")
                .tempdir_in(&base)
                .map_err(|e| {
                    Error::Usage(format!(
                        "cannot create a temporary cache in {}: {e}",
                        base.display()
                    ))
                })?;
            (Some(tmp.path().to_path_buf()), Some(Arc::new(tmp)))
        } else {
            (self.cache_dir.clone(), None)
        };
        Ok(OpenOptions {
            platform,
            platform_explicit: self.platform.is_some(),
            cache_dir,
            insecure_registries: self.insecure_registries.clone(),
            registry_ca: self.registry_ca.clone(),
            temp_cache,
        })
    }
}

#[derive(Debug, Args)]
struct MountArgs {
    /// Image reference, e.g. oci:./layout:tag.
    reference: String,
    /// Existing empty directory to mount on.
    mountpoint: PathBuf,
    #[command(flatten)]
    image: ImageArgs,
    /// Let other users (and root) see the mount; the kernel then checks the image's own
    /// permissions. Unprivileged users need `user_allow_other` in /etc/fuse.conf.
    #[arg(long)]
    allow_other: bool,
}

#[derive(Debug, Args)]
struct InspectArgs {
    /// Image reference, e.g. oci:./layout:tag.
    reference: String,
    #[command(flatten)]
    image: ImageArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Also fetch and merge the layers, and report the merged tree's totals.
    #[arg(long)]
    tree: bool,
}

#[derive(Debug, Args)]
struct PullArgs {
    /// Image reference, e.g. docker://registry:5000/app:tag or nginx:alpine.
    reference: String,
    #[command(flatten)]
    image: ImageArgs,
}

#[derive(Debug, Args)]
struct CacheArgs {
    #[command(subcommand)]
    command: CacheCommand,
}

#[derive(Debug, Subcommand)]
enum CacheCommand {
    /// Delete everything in the cache (decoded layers, downloaded blobs, partial downloads).
    Prune {
        /// Cache directory (default: $FLEDGE_CACHE_DIR, else $XDG_CACHE_HOME/fledge, else
        /// ~/.cache/fledge).
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
    },
}

/// Entry point used by `main.rs`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose, cli.quiet);
    let ui = Ui {
        verbose: cli.verbose,
        quiet: cli.quiet,
    };
    match run(cli.command, &ui) {
        Ok(code) => code,
        Err(err) => {
            report_error(&err);
            ExitCode::FAILURE
        }
    }
}

/// How chatty the commands should be.
#[derive(Clone, Copy, Debug)]
pub struct Ui {
    pub verbose: u8,
    pub quiet: bool,
}

impl Ui {
    /// A progress line on stderr unless `-q`.
    pub fn info(&self, msg: impl AsRef<str>) {
        if !self.quiet {
            eprintln!("{}", msg.as_ref());
        }
    }

    /// Whether progress bars should be drawn.
    pub fn progress_bars(&self) -> bool {
        !self.quiet && std::io::stderr().is_terminal()
    }
}

fn run(command: Command, ui: &Ui) -> Result<ExitCode, Error> {
    match command {
        Command::Build(args) => crate::build::run(&args, ui),
        Command::Doctor(args) => crate::doctor::run(&args, ui),
        Command::Mount(args) => mount(&args, ui),
        Command::Inspect(args) => inspect(&args, ui),
        Command::Pull(args) => pull(&args, ui),
        Command::Cache(args) => cache(&args, ui),
        Command::Version => {
            println!("fledge {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn mount(args: &MountArgs, ui: &Ui) -> Result<ExitCode, Error> {
    let opts = args.image.open_options()?;
    let opened = image::open_tree(&args.reference, &opts, ui)?;
    let tree = Arc::new(opened.tree);
    let mount_opts = MountOptions {
        allow_other: args.allow_other,
        fsname: format!("fledge:{}", args.reference),
        ..MountOptions::default()
    };
    let mountpoint = args.mountpoint.clone();
    fusefs::serve_foreground(tree, &args.mountpoint, &mount_opts, || {
        ui.info(format!(
            "mounted {} at {} (read-only); unmount or press Ctrl-C to stop",
            args.reference,
            mountpoint.display()
        ));
    })?;
    ui.info(format!("unmounted {}", mountpoint.display()));
    Ok(ExitCode::SUCCESS)
}

fn pull(args: &PullArgs, ui: &Ui) -> Result<ExitCode, Error> {
    let started = std::time::Instant::now();
    let opts = args.image.open_options()?;
    let (src, resolved) = image::resolve(&args.reference, &opts)?;
    let store = crate::layer::LayerStore::new(image::cache_dir(&opts)?);
    store.uncompressed_all(src.as_ref(), &resolved)?;
    ui.info(format!(
        "pulled {} from {}: {} ({}, {} layers) in {:.2}s",
        args.reference,
        src.describe(),
        resolved.manifest_digest,
        resolved.platform,
        resolved.layers.len(),
        started.elapsed().as_secs_f64()
    ));
    Ok(ExitCode::SUCCESS)
}

fn cache(args: &CacheArgs, ui: &Ui) -> Result<ExitCode, Error> {
    match &args.command {
        CacheCommand::Prune { cache_dir } => {
            let dir = match cache_dir {
                Some(d) => d.clone(),
                None => crate::layer::LayerStore::default_dir()?,
            };
            let report = crate::layer::LayerStore::new(&dir).prune()?;
            ui.info(format!(
                "pruned {}: {} files, {:.1} MiB freed",
                dir.display(),
                report.files,
                report.bytes as f64 / (1024.0 * 1024.0)
            ));
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn inspect(args: &InspectArgs, ui: &Ui) -> Result<ExitCode, Error> {
    let opts = args.image.open_options()?;
    let report = if args.tree {
        let opened = image::open_tree(&args.reference, &opts, ui)?;
        let mut report = InspectReport::from_image(&opened.resolved);
        report.tree = Some(opened.tree.stats());
        report
    } else {
        let (_source, resolved) = image::resolve(&args.reference, &opts)?;
        InspectReport::from_image(&resolved)
    };
    let mut out = std::io::stdout().lock();
    let text = if args.json {
        let mut s = serde_json::to_string_pretty(&report)
            .map_err(|e| Error::Usage(format!("cannot encode the report as JSON: {e}")))?;
        s.push('\n');
        s
    } else {
        report.render_text()
    };
    // A closed pipe (e.g. `| head`) is not an error worth reporting.
    let _ = out.write_all(text.as_bytes());
    Ok(ExitCode::SUCCESS)
}

fn init_logging(verbose: u8, quiet: bool) {
    use tracing_subscriber::EnvFilter;
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, _) => "debug",
    };
    // Other crates only speak up on errors unless -vv asks for more. fuser logs races at
    // unmount (a reply to a request the kernel already dropped) as errors although nothing
    // failed; fledge reports real FUSE failures itself, so fuser is silent below -vv.
    let others = if verbose >= 2 {
        "warn"
    } else {
        "error,fuser=off"
    };
    let filter = EnvFilter::try_from_env("FLEDGE_LOG")
        .unwrap_or_else(|_| EnvFilter::new(format!("{others},fledge={default}")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .without_time()
        .try_init();
}

/// Print an error as one line (the whole cause chain) plus a hint line when there is one.
pub fn report_error(err: &Error) {
    let mut line = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        let text = cause.to_string();
        // thiserror's `transparent` and `#[from]` wrappers often repeat their cause's text.
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    eprintln!("error: {line}");
    if let Some(hint) = err.hint() {
        eprintln!("hint: {hint}");
    }
}
