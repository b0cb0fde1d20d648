//! Processor groups as the miniature NT presents them: NT numbers its CPUs by a system-wide
//! index and, for affinity, by (group, number in the group). The grouping follows the CPU
//! count: up to 2 CPUs form one group; with more, groups of [`SPLIT_GROUP_SIZE`] (4 CPUs are
//! two groups of 2), so ackvisor's every-group loop (`KeGetProcessorNumberFromIndex`, then a
//! GROUP_AFFINITY per CPU) meets a group other than 0.
//!
//! **Runs in:** any IRQL (pure arithmetic over the online count).

use super::layout::{GROUP_AFFINITY, PROCESSOR_NUMBER};

/// CPUs per group once the machine has more than [`SPLIT_GROUP_SIZE`] CPUs.
pub const SPLIT_GROUP_SIZE: u32 = 2;

/// CPUs online (the system-wide indices are `0..online()`).
pub fn online() -> u32 {
    crate::percpu::online_count()
}

/// CPUs per group.
pub fn group_size() -> u32 {
    let n = online();
    if n > SPLIT_GROUP_SIZE {
        SPLIT_GROUP_SIZE
    } else {
        n.max(1)
    }
}

/// Groups.
pub fn group_count() -> u32 {
    online().div_ceil(group_size()).max(1)
}

/// Active CPUs of `group` (0 for a group that does not exist).
pub fn active_in(group: u16) -> u32 {
    let (size, n) = (group_size(), online());
    let first = u32::from(group) * size;
    if u32::from(group) >= group_count() {
        0
    } else {
        (n - first).min(size)
    }
}

/// The (group, number) of system-wide index `index`, None past the online CPUs.
pub fn number_of(index: u32) -> Option<PROCESSOR_NUMBER> {
    (index < online()).then(|| PROCESSOR_NUMBER {
        Group: (index / group_size()) as u16,
        Number: (index % group_size()) as u8,
        Reserved: 0,
    })
}

/// Why an affinity names no CPU the miniature NT can run a thread on.
#[derive(Clone, Copy, Debug)]
pub enum AffinityError {
    /// The mask names a CPU the group does not have (or the group does not exist).
    NoSuchCpu,
    /// The mask names no CPU.
    Empty,
    /// The mask names more than one CPU (see `routines`' affinity routines).
    SeveralCpus,
}

/// The system-wide index of the one CPU `affinity` names.
pub fn index_of(affinity: &GROUP_AFFINITY) -> Result<u32, AffinityError> {
    match affinity.Mask.count_ones() {
        0 => return Err(AffinityError::Empty),
        1 => {}
        _ => return Err(AffinityError::SeveralCpus),
    }
    let bit = affinity.Mask.trailing_zeros();
    if bit >= active_in(affinity.Group) {
        return Err(AffinityError::NoSuchCpu);
    }
    Ok(u32::from(affinity.Group) * group_size() + bit)
}

/// The GROUP_AFFINITY naming exactly CPU `index`.
pub fn affinity_of(index: u32) -> GROUP_AFFINITY {
    let n = number_of(index).unwrap_or(PROCESSOR_NUMBER {
        Group: 0,
        Number: 0,
        Reserved: 0,
    });
    GROUP_AFFINITY {
        Mask: 1usize << n.Number,
        Group: n.Group,
        Reserved: [0; 3],
    }
}
