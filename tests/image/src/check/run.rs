//! The check of one image file, with the inputs found beside it.

use std::path::{Path, PathBuf};

use super::{ExportLists, Names, Report, check};

/// What to check and against what.
#[derive(Clone, Debug)]
pub struct Target {
    /// The image.
    pub image: PathBuf,
    /// The directory of its export lists (`ntoskrnl.def`, `hal.def`); default `exports/`
    /// beside the image (where win-check leaves them) or the image build's.
    pub exports: Option<PathBuf>,
    /// Its PDB; default `<image>.pdb` beside it when present.
    pub pdb: Option<PathBuf>,
}

/// Reads and checks the image.
pub fn check_file(t: &Target) -> Result<Report, String> {
    let data = std::fs::read(&t.image).map_err(|e| format!("read {}: {e}", t.image.display()))?;
    let exports_dir = t
        .exports
        .clone()
        .or_else(|| beside(&t.image, "exports").filter(|p| p.is_dir()))
        .unwrap_or_else(|| crate::build::cache_dir().join("kit").join("exports"));
    let exports = ExportLists::read_dir(&exports_dir)?;
    let pdb = t
        .pdb
        .clone()
        .or_else(|| Some(t.image.with_extension("pdb")).filter(|p| p.is_file()));
    // Names only from the PDB this image was linked with (its CodeView record's GUID).
    let guid = object::read::pe::PeFile64::parse(&*data)
        .ok()
        .and_then(|pe| {
            object::Object::pdb_info(&pe)
                .ok()
                .flatten()
                .map(|cv| cv.guid())
        });
    let names = match (&pdb, guid) {
        (Some(p), Some(guid)) => Names::from_pdb_matching(p, Some(guid))?,
        _ => Names::none(),
    };
    Ok(check(&data, exports, &names))
}

fn beside(image: &Path, name: &str) -> Option<PathBuf> {
    image.parent().map(|d| d.join(name))
}
