//! The export lists an image's imports are held to: `.def` files (`LIBRARY name`, then one
//! export a line after `EXPORTS`, `DATA` marking a variable), as the image build and win-check
//! leave them beside their images.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Export names by module (lower case, e.g. `ntoskrnl.exe`).
#[derive(Clone, Debug, Default)]
pub struct ExportLists {
    modules: BTreeMap<String, BTreeSet<String>>,
}

impl ExportLists {
    /// Reads every `*.def` in `dir`.
    pub fn read_dir(dir: &Path) -> Result<Self, String> {
        let mut lists = Self::default();
        let entries = std::fs::read_dir(dir).map_err(|e| format!("read {}: {e}", dir.display()))?;
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            if path.extension().is_some_and(|x| x == "def") {
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("read {}: {e}", path.display()))?;
                lists.add_def(&text);
            }
        }
        if lists.modules.is_empty() {
            return Err(format!("no .def export list in {}", dir.display()));
        }
        Ok(lists)
    }

    /// Adds one `.def` file's text.
    pub fn add_def(&mut self, text: &str) {
        let mut module = None;
        let mut in_exports = false;
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with(';') {
                continue;
            }
            if let Some(name) = line.strip_prefix("LIBRARY") {
                module = Some(name.trim().trim_matches('"').to_ascii_lowercase());
                in_exports = false;
            } else if line == "EXPORTS" {
                in_exports = true;
            } else if in_exports
                && let (Some(m), Some(name)) = (&module, line.split_whitespace().next())
            {
                self.modules
                    .entry(m.clone())
                    .or_default()
                    .insert(name.to_string());
            }
        }
    }

    /// Whether `module` (lower case) exports `name`.
    pub fn contains(&self, module: &str, name: &str) -> bool {
        self.modules.get(module).is_some_and(|s| s.contains(name))
    }
}
