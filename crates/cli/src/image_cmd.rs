//! `hutch image build | ls`.

use crate::{agent_bin, args::ImageBuildArgs, error::CliError, home::Home};

/// Builds (or reuses) an image and prints where it is.
pub async fn build(home: &Home, args: ImageBuildArgs) -> Result<i32, CliError> {
    let agent = agent_bin::find(args.agent)?;
    let mut spec = hutch_image::BuildSpec::new(args.name, agent);
    spec.suite = args.suite;
    spec.mirror = args.mirror;
    if !args.packages.is_empty() {
        spec.packages = args.packages;
    }
    let images = home.images();
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let image = tokio::task::spawn_blocking(move || hutch_image::build(&images, &spec, progress))
        .await
        .map_err(|_| CliError::Interrupted)??;
    println!(
        "{}  {}  kernel {}",
        image.name, image.digest, image.kernel_release
    );
    Ok(0)
}

/// Lists built images.
pub fn list(home: &Home) -> Result<i32, CliError> {
    let images = hutch_image::list(&home.images())?;
    if images.is_empty() {
        eprintln!("no images: build one with `hutch image build`");
    }
    for i in images {
        println!("{:<20} {:<16} {}", i.name, i.kernel_release, i.digest);
    }
    Ok(0)
}
