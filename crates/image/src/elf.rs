//! Just enough ELF64 parsing: is a binary a static x86_64 executable, and what is in a kernel
//! module's `.modinfo` section.

/// `PT_INTERP`: the program header that names a dynamic loader.
const PT_INTERP: u32 = 3;
/// `EM_X86_64`.
const EM_X86_64: u16 = 62;
/// `ET_EXEC`.
const ET_EXEC: u16 = 2;
/// `ET_DYN` (also used by static-pie executables).
const ET_DYN: u16 = 3;

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<usize> {
    usize::try_from(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?)).ok()
}

/// Checks the ELF identification of a little-endian ELF64 file.
fn is_elf64_le(b: &[u8]) -> bool {
    b.len() >= 64 && &b[..4] == b"\x7fELF" && b[4] == 2 && b[5] == 1
}

/// Returns `Ok(())` if `b` is a static ELF64 x86_64 executable, or the reason it is not.
pub(crate) fn check_static_x86_64(b: &[u8]) -> Result<(), String> {
    if !is_elf64_le(b) {
        return Err("not an ELF64 little-endian file".into());
    }
    let bad = || "truncated ELF header".to_owned();
    let e_type = u16_at(b, 16).ok_or_else(bad)?;
    let e_machine = u16_at(b, 18).ok_or_else(bad)?;
    if e_machine != EM_X86_64 {
        return Err(format!("built for ELF machine {e_machine}, not x86_64"));
    }
    if e_type != ET_EXEC && e_type != ET_DYN {
        return Err("not an executable".into());
    }
    let phoff = u64_at(b, 32).ok_or_else(bad)?;
    let phentsize = usize::from(u16_at(b, 54).ok_or_else(bad)?);
    let phnum = usize::from(u16_at(b, 56).ok_or_else(bad)?);
    if phnum == 0 || phentsize < 56 {
        return Err("no program headers".into());
    }
    for i in 0..phnum {
        let p_type = u32_at(b, phoff + i * phentsize).ok_or("truncated program headers")?;
        if p_type == PT_INTERP {
            return Err(
                "dynamically linked; build it with --target x86_64-unknown-linux-musl".into(),
            );
        }
    }
    Ok(())
}

/// Returns the `key=value` strings of a kernel module's `.modinfo` section, or `None` if `b` is
/// not an ELF64 file with such a section.
pub(crate) fn modinfo(b: &[u8]) -> Option<Vec<(String, String)>> {
    if !is_elf64_le(b) {
        return None;
    }
    let shoff = u64_at(b, 40)?;
    let shentsize = usize::from(u16_at(b, 58)?);
    let shnum = usize::from(u16_at(b, 60)?);
    let shstrndx = usize::from(u16_at(b, 62)?);
    if shentsize < 64 || shstrndx >= shnum {
        return None;
    }
    let section = |i: usize| -> Option<(u32, usize, usize)> {
        let h = shoff.checked_add(i.checked_mul(shentsize)?)?;
        Some((u32_at(b, h)?, u64_at(b, h + 24)?, u64_at(b, h + 32)?))
    };
    let (_, str_off, str_size) = section(shstrndx)?;
    let strtab = b.get(str_off..str_off.checked_add(str_size)?)?;
    for i in 0..shnum {
        let (name, off, size) = section(i)?;
        let name = strtab.get(name as usize..)?;
        let name = &name[..name.iter().position(|&c| c == 0)?];
        if name != b".modinfo" {
            continue;
        }
        let data = b.get(off..off.checked_add(size)?)?;
        return Some(
            data.split(|&c| c == 0)
                .filter_map(|kv| {
                    let kv = std::str::from_utf8(kv).ok()?;
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_owned(), v.to_owned()))
                })
                .collect(),
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_binary_is_rejected() {
        let b = std::fs::read("/bin/true").unwrap();
        let err = check_static_x86_64(&b).unwrap_err();
        assert!(err.contains("dynamically linked"), "{err}");
        assert!(err.contains("x86_64-unknown-linux-musl"), "{err}");
    }

    #[test]
    fn static_binary_is_accepted() {
        let Ok(b) = std::fs::read("/bin/busybox") else {
            eprintln!("/bin/busybox missing; skipping");
            return;
        };
        // `/bin/busybox` from busybox-static; the plain `busybox` package is dynamic.
        match check_static_x86_64(&b) {
            Ok(()) => {}
            Err(e) => assert!(e.contains("dynamically"), "{e}"),
        }
    }

    /// A minimal static ELF64 x86_64 executable: header plus one PT_LOAD.
    fn tiny_elf(p_type: u32, machine: u16) -> Vec<u8> {
        let mut b = vec![0u8; 64 + 56];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[6] = 1;
        b[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        b[18..20].copy_from_slice(&machine.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&1u16.to_le_bytes());
        b[64..68].copy_from_slice(&p_type.to_le_bytes());
        b
    }

    #[test]
    fn synthetic_elves() {
        assert_eq!(check_static_x86_64(&tiny_elf(1, EM_X86_64)), Ok(()));
        assert!(check_static_x86_64(&tiny_elf(PT_INTERP, EM_X86_64))
            .unwrap_err()
            .contains("dynamically"));
        assert!(check_static_x86_64(&tiny_elf(1, 183))
            .unwrap_err()
            .contains("not x86_64"));
        assert!(check_static_x86_64(b"#!/bin/sh\necho hi\n")
            .unwrap_err()
            .contains("not an ELF"));
    }

    #[test]
    fn modinfo_of_non_module() {
        assert_eq!(modinfo(b"nope"), None);
        let b = std::fs::read("/bin/true").unwrap();
        assert_eq!(modinfo(&b), None);
    }
}
