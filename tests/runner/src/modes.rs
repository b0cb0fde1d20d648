//! `ACKVISOR_TEST_MODES`: the interrupt modes the multi-CPU and `control` tests go through.
//! A name that is not a mode fails the run: a typo would otherwise quietly test less.

use ackvisor_vmm::Mode;

/// Every mode's name, in `Mode as u32` order (the kernel's `modes` param takes a bit per index).
pub const ALL: [&str; 4] = [
    Mode::ALL[0].name(),
    Mode::ALL[1].name(),
    Mode::ALL[2].name(),
    Mode::ALL[3].name(),
];

/// Parses a comma list of mode names; empty (or only blanks) means all four. Unknown names are
/// an error naming them.
pub fn parse(list: &str) -> Result<Vec<&'static str>, String> {
    if list.trim().is_empty() {
        return Ok(ALL.to_vec());
    }
    let mut out = Vec::new();
    let mut unknown = Vec::new();
    for word in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        match ALL.iter().find(|m| **m == word) {
            Some(m) if !out.contains(m) => out.push(*m),
            Some(_) => {}
            None => unknown.push(word.to_string()),
        }
    }
    if !unknown.is_empty() {
        return Err(format!(
            "ACKVISOR_TEST_MODES names unknown mode(s) {}; the modes are {}",
            unknown.join(", "),
            ALL.join(", ")
        ));
    }
    if out.is_empty() {
        return Err("ACKVISOR_TEST_MODES names no mode".into());
    }
    // Run them in the order the kernel does (its `modes` param is a bit set).
    out.sort_by_key(|m| ALL.iter().position(|a| a == m));
    Ok(out)
}

/// The modes from the environment; panics (failing the test) on an unknown name.
pub fn from_env() -> Vec<&'static str> {
    let list = std::env::var("ACKVISOR_TEST_MODES").unwrap_or_default();
    parse(&list).unwrap_or_else(|e| panic!("{e}"))
}

/// The kernel's `modes` param for `modes`: bit `i` for `ALL[i]`.
pub fn bits(modes: &[&str]) -> u32 {
    ALL.iter()
        .enumerate()
        .filter(|(_, m)| modes.contains(m))
        .fold(0, |b, (i, _)| b | 1 << i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_cores_mode_numbers() {
        for (i, name) in ALL.iter().enumerate() {
            assert_eq!(Mode::from_name(name).map(|m| m as usize), Some(i));
        }
    }

    #[test]
    fn empty_means_all_four() {
        assert_eq!(parse("").unwrap(), ALL.to_vec());
        assert_eq!(parse("  ").unwrap(), ALL.to_vec());
        assert_eq!(bits(&ALL), 0xF);
    }

    #[test]
    fn a_list_selects_its_modes_in_kernel_order() {
        assert_eq!(
            parse("ack-inject, passthrough").unwrap(),
            vec!["passthrough", "ack-inject"]
        );
        assert_eq!(bits(&["passthrough", "ack-inject"]), 0b1001);
    }

    #[test]
    fn an_unknown_name_fails_and_is_named() {
        let e = parse("passthrough,ack-replya").unwrap_err();
        assert!(e.contains("ack-replya"), "{e}");
        assert!(parse(",").is_err());
    }
}
