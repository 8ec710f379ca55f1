//! The binary needs nothing from glibc: it runs inside the Alpine (musl) root of
//! ../shared/fixtures, as root and as uid 70 (postgres in the Alpine image).

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

const ALPINE: &str = "../shared/fixtures/alpine-minirootfs-3.20.3-x86_64.tar.gz";

/// ELF program header type of the dynamic loader request.
const PT_INTERP: u32 = 3;

fn program_header_types(elf: &[u8]) -> Vec<u32> {
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    assert_eq!(&elf[..4], b"\x7fELF");
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    (0..phnum).map(|i| u32_at(phoff + i * phentsize)).collect()
}

#[test]
fn binary_requests_no_dynamic_loader() {
    let elf = std::fs::read(pgentry_bin()).unwrap();
    assert!(
        !program_header_types(&elf).contains(&PT_INTERP),
        "pgentry is dynamically linked"
    );
}

fn alpine_root(dir: &TempDir) -> PathBuf {
    let root = dir.join("alpine");
    std::fs::create_dir_all(&root).unwrap();
    let out = Command::new("tar")
        .arg("-xzf")
        .arg(ALPINE)
        .arg("-C")
        .arg(&root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tar: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !root.join("lib/libc.so.6").exists() && root.join("lib/ld-musl-x86_64.so.1").exists(),
        "not a musl root"
    );
    std::fs::create_dir_all(root.join("usr/local/bin")).unwrap();
    std::fs::copy(pgentry_bin(), root.join("usr/local/bin/pgentry")).unwrap();
    // The postgres:15-alpine image's account.
    let mut passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    passwd.push_str("postgres:x:70:70:PostgreSQL:/var/lib/postgresql:/bin/sh\n");
    std::fs::write(root.join("etc/passwd"), passwd).unwrap();
    root
}

fn chroot(
    root: &Path,
    user: Option<&str>,
    env: &[(&str, &str)],
    args: &[&str],
) -> std::process::Output {
    // Absolute: the child PATH set below is the Alpine one, which Command would search.
    let mut cmd = Command::new("/usr/sbin/chroot");
    if let Some(u) = user {
        cmd.arg(format!("--userspec={u}"));
    }
    cmd.arg(root)
        .arg("/usr/local/bin/pgentry")
        .args(args)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin");
    cmd.envs(env.iter().copied());
    cmd.output().unwrap()
}

#[test]
fn runs_in_the_alpine_root_as_root_and_as_uid_70() {
    if postgres_ids().is_none() {
        eprintln!("SKIPPED: chroot needs root");
        return;
    }
    let dir = TempDir::new("alpine");
    let root = alpine_root(&dir);
    for user in [None, Some("70:70")] {
        let out = chroot(&root, user, &[], &["--version"]);
        assert!(
            out.status.success(),
            "{user:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("pgentry "));
        let out = chroot(
            &root,
            user,
            &[
                ("PGENTRY_PRIMARY_HOST", "db"),
                ("PGENTRY_REPLICATION_PASSWORD", "pw"),
            ],
            &["check-config"],
        );
        assert!(
            out.status.success(),
            "{user:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("# role: replica") && !text.contains("pw\n"),
            "{text}"
        );
    }
    // As root, `run` drops to uid 70, resolves the primary's name through musl's
    // /etc/hosts and waits for it: the whole start-up path works without glibc.
    std::fs::write(root.join("pw"), "pw").unwrap();
    let out = chroot(
        &root,
        None,
        &[
            ("PGENTRY_PRIMARY_HOST", "localhost"),
            ("PGENTRY_PRIMARY_PORT", &free_port().to_string()),
            ("PGENTRY_REPLICATION_PASSWORD_FILE", "/pw"),
            ("PGENTRY_WAIT_TIMEOUT", "1"),
        ],
        &["run"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("waiting for primary localhost") && err.contains("connection refused"),
        "{err}"
    );
    use std::os::unix::fs::MetadataExt;
    let pgdata = std::fs::metadata(root.join("var/lib/postgresql/data")).unwrap();
    assert_eq!((pgdata.uid(), pgdata.mode() & 0o777), (70, 0o700));
}
