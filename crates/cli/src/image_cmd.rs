//! `hutch image build | ls | kernel`.

use crate::{agent_bin, args::ImageBuildArgs, error::CliError};
use hutch_daemon::Home;

/// Builds (or reuses) an image and prints where it is.
pub async fn build(home: &Home, args: ImageBuildArgs) -> Result<i32, CliError> {
    let agent = agent_bin::find(args.agent)?;
    let mut spec = hutch_image::BuildSpec::new(args.name, agent);
    spec.suite = args.suite;
    spec.mirror = args.mirror;
    if args.no_default_packages {
        spec.packages.clear();
    }
    spec.packages.extend(args.packages);
    let images = home.images();
    let image = tokio::task::spawn_blocking(move || hutch_image::build(&images, &spec, true))
        .await
        .map_err(|_| CliError::Interrupted)??;
    println!(
        "{}  {}  kernel {}",
        image.name, image.digest, image.kernel_release
    );
    Ok(0)
}

/// `hutch image kernel`.
#[derive(Debug, clap::Args)]
pub struct ImageKernelArgs {
    /// Build from the distro's `linux-source` package with Hutch's microVM config fragment
    /// (the only way for now; takes tens of minutes).
    #[arg(long, required = true)]
    pub from_source: bool,
    /// Debian suite whose `linux-source` to build.
    #[arg(long, default_value = hutch_image::DEFAULT_SUITE)]
    pub suite: String,
    /// Debian mirror URL (default: the Debian archive in this host's apt sources).
    #[arg(long)]
    pub mirror: Option<String>,
    /// Parallel make jobs (default: the number of CPUs).
    #[arg(long)]
    pub jobs: Option<usize>,
}

/// Builds (or finds in the cache) the microVM kernel and prints where it is.
pub async fn kernel(home: &Home, args: ImageKernelArgs) -> Result<i32, CliError> {
    let spec = hutch_image::kernel_src::SourceKernelSpec {
        suite: args.suite,
        mirror: args.mirror,
        jobs: args
            .jobs
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
    };
    hutch_image::kernel_src::validate(&spec)?;
    let images = home.images();
    let k =
        tokio::task::spawn_blocking(move || hutch_image::kernel_src::build(&images, &spec, true))
            .await
            .map_err(|_| CliError::Interrupted)??;
    println!("kernel {}", k.release);
    println!("vmlinux {}", k.vmlinux.display());
    println!("bzImage {}", k.bzimage.display());
    Ok(0)
}

/// Lists built images: a table, or a JSON array with `json`.
pub fn list(home: &Home, json: bool) -> Result<i32, CliError> {
    let images = hutch_image::list(&home.images())?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&images).expect("serializable")
        );
        return Ok(0);
    }
    if images.is_empty() {
        eprintln!("no images: build one with `hutch image build`");
    }
    for i in images {
        println!("{:<20} {:<16} {}", i.name, i.kernel_release, i.digest);
    }
    Ok(0)
}
