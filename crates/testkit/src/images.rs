//! [`FakeImages`]: images that need no build.

use std::path::PathBuf;

use hutch_core::ImageSource;
use hutch_image::{Image, ImageError};

/// An [`ImageSource`] holding exactly the images it was given the names of. Their files do not
/// exist ([`crate::FakeVmm`] never reads them); each has a digest of its own.
#[derive(Debug, Clone)]
pub struct FakeImages {
    names: Vec<String>,
}

impl FakeImages {
    /// Images called `names`.
    pub fn new<S: Into<String>>(names: impl IntoIterator<Item = S>) -> FakeImages {
        FakeImages {
            names: names.into_iter().map(Into::into).collect(),
        }
    }
}

impl ImageSource for FakeImages {
    fn open(&self, name: &str) -> Result<Image, ImageError> {
        hutch_image::validate_name(name)?;
        if !self.names.iter().any(|n| n == name) {
            return Err(ImageError::NotFound { name: name.into() });
        }
        let file = |f: &str| PathBuf::from(format!("/nonexistent/hutch-fake-images/{name}/{f}"));
        Ok(Image {
            name: name.into(),
            kernel: file("vmlinuz"),
            vmlinux: Some(file("vmlinux")),
            initrd: file("initrd"),
            rootfs: file("rootfs"),
            kernel_release: "fake".into(),
            digest: format!("sha256:fake-{name}"),
        })
    }
}
