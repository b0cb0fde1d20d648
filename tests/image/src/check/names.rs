//! Function names for the report, from the PDB the linker writes beside the image.

use std::collections::BTreeMap;
use std::path::Path;

use pdb::FallibleIterator;

/// Names by RVA.
#[derive(Clone, Debug, Default)]
pub struct Names {
    by_rva: BTreeMap<u32, String>,
    /// Public symbols that are not marked as functions (assembly labels such as
    /// `ackvisor_exit_slow`, and data), by RVA.
    labels: BTreeMap<u32, String>,
}

impl Names {
    /// No names: functions are labelled by address.
    pub fn none() -> Self {
        Self::default()
    }

    /// The procedures (and, where a procedure record is missing, the public symbols) of a PDB.
    pub fn from_pdb(path: &Path) -> Result<Self, String> {
        Self::from_pdb_matching(path, None)
    }

    /// Like [`Names::from_pdb`], but only from the PDB whose GUID is `guid` (the image's
    /// CodeView record, Windows byte order): a PDB left over from another link would name the
    /// wrong functions. No names (and no error) when it does not match.
    pub fn from_pdb_matching(path: &Path, guid: Option<[u8; 16]>) -> Result<Self, String> {
        let err = |e: pdb::Error| format!("{}: {e}", path.display());
        let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut pdb = pdb::PDB::open(file).map_err(err)?;
        if let Some(guid) = guid
            && pdb.pdb_information().map_err(err)?.guid.to_bytes_le() != guid
        {
            return Ok(Self::none());
        }
        let map = pdb.address_map().map_err(err)?;
        let mut by_rva = BTreeMap::new();
        let mut labels = BTreeMap::new();
        let globals = pdb.global_symbols().map_err(err)?;
        let mut it = globals.iter();
        while let Some(sym) = it.next().map_err(err)? {
            if let Ok(pdb::SymbolData::Public(p)) = sym.parse()
                && let Some(rva) = p.offset.to_rva(&map)
            {
                let into = if p.function { &mut by_rva } else { &mut labels };
                into.insert(rva.0, p.name.to_string().into_owned());
            }
        }
        let info = pdb.debug_information().map_err(err)?;
        let mut modules = info.modules().map_err(err)?;
        while let Some(module) = modules.next().map_err(err)? {
            let Some(mi) = pdb.module_info(&module).map_err(err)? else {
                continue;
            };
            let mut syms = mi.symbols().map_err(err)?;
            while let Some(sym) = syms.next().map_err(err)? {
                if let Ok(pdb::SymbolData::Procedure(p)) = sym.parse()
                    && let Some(rva) = p.offset.to_rva(&map)
                {
                    // A procedure record's name is the readable path; it wins over the
                    // mangled public name.
                    by_rva.insert(rva.0, p.name.to_string().into_owned());
                }
            }
        }
        Ok(Self { by_rva, labels })
    }

    /// The name of the function at `rva`.
    pub fn get(&self, rva: u32) -> Option<&str> {
        self.by_rva.get(&rva).map(String::as_str)
    }

    /// The RVAs of the functions whose name ends with `suffix` (a path's last segments, e.g.
    /// `exit::stub::vm_exit_entry`), in address order.
    pub fn rvas_ending_with(&self, suffix: &str) -> Vec<u32> {
        self.by_rva
            .iter()
            .filter(|(_, name)| name.ends_with(suffix))
            .map(|(&rva, _)| rva)
            .collect()
    }

    /// Every function's name with its RVA, in address order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &str)> {
        self.by_rva.iter().map(|(&rva, name)| (rva, name.as_str()))
    }

    /// The public symbols not marked as functions (assembly labels, data), RVA and name.
    pub fn labels(&self) -> impl Iterator<Item = (u32, &str)> {
        self.labels.iter().map(|(&rva, name)| (rva, name.as_str()))
    }

    /// How many names there are.
    pub fn len(&self) -> usize {
        self.by_rva.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_rva.is_empty()
    }
}
