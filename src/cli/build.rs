//! `fledge build`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::Args;

use super::{print_json, CliError, ImageArgs};
use crate::config::ImageFormat;
use crate::output::{self, BackendChoice, BuildRequest};
use crate::ui::Ui;

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Build configuration.
    #[arg(short, long, value_name = "FILE", default_value = "fledge.toml")]
    pub config: PathBuf,
    /// Output image path (default: derived from the image reference and the filesystem type,
    /// e.g. nginx.img, nginx.squashfs, nginx.erofs).
    #[arg(short, long, value_name = "OUT.img")]
    pub output: Option<PathBuf>,
    /// Plugin manifest settings (name, version, runtime, resources, ...).
    #[arg(long, value_name = "manifest.toml")]
    pub manifest: Option<PathBuf>,
    /// Formatter backend.
    #[arg(long, value_parser = backend_parser(), default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// Image file format, over `[filesystem] image_format`: raw, or qcow2 (only the
    /// allocated clusters; default output name NAME.qcow2).
    #[arg(long, value_name = "FORMAT", value_parser = ["raw", "qcow2"])]
    pub image_format: Option<String>,
    /// Print a JSON report of the finished build on stdout (outputs, size, sha256, backend,
    /// timings) instead of the summary line. Errors are reported as without it: on stderr,
    /// with a non-zero exit status and nothing on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub image: ImageArgs,
}

/// `--backend`: the library's names and descriptions, so help texts and completions list
/// every choice.
fn backend_parser() -> impl TypedValueParser<Value = BackendChoice> {
    PossibleValuesParser::new(
        BackendChoice::ALL.map(|b| PossibleValue::new(b.as_str()).help(b.description())),
    )
    .try_map(|s| s.parse::<BackendChoice>())
}

impl BuildArgs {
    /// The library's request.
    pub fn request(&self) -> BuildRequest {
        BuildRequest {
            config: self.config.clone(),
            output: self.output.clone(),
            manifest: self.manifest.clone(),
            backend: self.backend,
            image: self.image.request(),
            image_format: self.image_format.as_deref().map(|f| match f {
                "qcow2" => ImageFormat::Qcow2,
                _ => ImageFormat::Raw,
            }),
            source_date_epoch: output::source_date_epoch_from_env(),
        }
    }
}

pub fn run(args: &BuildArgs, ui: &Ui) -> Result<ExitCode, CliError> {
    let outcome = output::run(&args.request(), ui)?;
    if args.json {
        print_json(&outcome, "build report")?;
    } else {
        ui.info(outcome.summary());
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::super::Cli;
    use super::*;
    use clap::Parser;

    fn build_args(argv: &[&str]) -> Result<BuildArgs, clap::Error> {
        let cli = Cli::try_parse_from(argv)?;
        match cli.command {
            super::super::Command::Build(b) => Ok(b),
            other => panic!("parsed {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let b = build_args(&["fledge", "build"]).unwrap();
        assert!(!b.json);
        assert_eq!(b.request(), BuildRequest::new("fledge.toml"));
    }

    #[test]
    fn image_format_parses() {
        let b = build_args(&["fledge", "build", "--image-format", "qcow2"]).unwrap();
        assert_eq!(b.request().image_format, Some(ImageFormat::Qcow2));
        let b = build_args(&["fledge", "build", "--image-format", "raw"]).unwrap();
        assert_eq!(b.request().image_format, Some(ImageFormat::Raw));
        assert!(build_args(&["fledge", "build", "--image-format", "vmdk"]).is_err());
    }

    #[test]
    fn every_backend_parses() {
        for choice in BackendChoice::ALL {
            let b = build_args(&["fledge", "build", "--backend", choice.as_str()]).unwrap();
            assert_eq!(b.request().backend, choice);
        }
        let err = build_args(&["fledge", "build", "--backend", "fast"]).unwrap_err();
        let text = err.to_string();
        for choice in BackendChoice::ALL {
            assert!(text.contains(choice.as_str()), "{text}");
        }
    }

    #[test]
    fn request_carries_every_option() {
        let b = build_args(&[
            "fledge",
            "build",
            "-c",
            "x.toml",
            "-o",
            "out/a.img",
            "--manifest",
            "m.toml",
            "--backend",
            "native",
            "--json",
            "--platform",
            "linux/arm64",
            "--cache-dir",
            "/c",
            "--insecure-registry",
            "r:5000",
            "--registry-ca",
            "ca.pem",
        ])
        .unwrap();
        assert!(b.json);
        let r = b.request();
        assert_eq!(r.config, PathBuf::from("x.toml"));
        assert_eq!(r.output, Some(PathBuf::from("out/a.img")));
        assert_eq!(r.manifest, Some(PathBuf::from("m.toml")));
        assert_eq!(r.backend, BackendChoice::Native);
        assert_eq!(r.image.platform.as_deref(), Some("linux/arm64"));
        assert_eq!(r.image.cache_dir, Some(PathBuf::from("/c")));
        assert!(!r.image.no_cache);
        assert_eq!(r.image.insecure_registries, ["r:5000"]);
        assert_eq!(r.image.registry_ca, Some(PathBuf::from("ca.pem")));
    }
}
