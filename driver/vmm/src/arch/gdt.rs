//! Segment descriptors and VMCS access rights (SDM 3A, "Segment Descriptors"; SDM 3C,
//! "Guest Register State").
//!
//! **Runs in:** anywhere (pure).
#![forbid(unsafe_code)]

/// VMCS access-rights value of an unusable segment (bit 16).
pub const AR_UNUSABLE: u32 = 1 << 16;

/// A segment as the VMCS wants it, decoded from GDT bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Base address (64-bit for system descriptors).
    pub base: u64,
    /// Limit in bytes (granularity applied).
    pub limit: u32,
    /// Access rights in VMCS format (type, S, DPL, P, AVL, L, D/B, G; bit 16 unusable).
    pub access_rights: u32,
}

/// Decodes the descriptor for `selector` from a GDT given as quadwords. A null selector, or one
/// past the table, is unusable (what VM entry expects for a null data segment).
pub fn decode(gdt: &[u64], selector: u16) -> Segment {
    let index = usize::from(selector >> 3);
    let unusable = Segment {
        base: 0,
        limit: 0,
        access_rights: AR_UNUSABLE,
    };
    if selector & !3 == 0 || selector & 4 != 0 {
        return unusable;
    }
    let Some(&d) = gdt.get(index) else {
        return unusable;
    };
    let mut base = ((d >> 16) & 0xFF_FFFF) | (((d >> 56) & 0xFF) << 24);
    let mut limit = ((d & 0xFFFF) | (((d >> 48) & 0xF) << 16)) as u32;
    let access = ((d >> 40) & 0xF0FF) as u32;
    if access & (1 << 15) != 0 {
        // G: limit counts 4 KiB pages.
        limit = (limit << 12) | 0xFFF;
    }
    let system = access & (1 << 4) == 0;
    if system {
        // 64-bit system descriptors (TSS, LDT) take the next quadword as base 63:32.
        base |= gdt.get(index + 1).map_or(0, |hi| (hi & 0xFFFF_FFFF) << 32);
    }
    Segment {
        base,
        limit,
        access_rights: access,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_long_mode_code_data_and_tss() {
        let gdt = [
            0,
            0x00AF_9B00_0000_FFFF,
            0x00CF_9300_0000_FFFF,
            0x0000_8B12_3456_0067,
            0xFFFF_F800,
        ];
        let cs = decode(&gdt, 0x08);
        assert_eq!(cs.access_rights, 0xA09B);
        assert_eq!(cs.limit, 0xFFFF_FFFF);
        let ds = decode(&gdt, 0x10);
        assert_eq!(ds.access_rights, 0xC093);
        let tr = decode(&gdt, 0x18);
        assert_eq!(tr.access_rights, 0x8B);
        assert_eq!(tr.limit, 0x67);
        assert_eq!(tr.base, 0xFFFF_F800_0012_3456);
    }

    #[test]
    fn null_ldt_and_out_of_range_selectors_are_unusable() {
        let gdt = [0, 0x00AF_9B00_0000_FFFF];
        assert_eq!(decode(&gdt, 0).access_rights, AR_UNUSABLE);
        assert_eq!(decode(&gdt, 0x0C).access_rights, AR_UNUSABLE);
        assert_eq!(decode(&gdt, 0x40).access_rights, AR_UNUSABLE);
    }
}
