//! What a data directory holds, and what to do with it.
//!
//! [`inspect`] gathers plain facts; [`decide_replica`] and [`decide_primary`] are pure
//! functions from those facts to an action or a refusal. Nothing here writes: a
//! refusal leaves every file as it was.

use std::fmt;
use std::io;
use std::path::Path;

/// Name of the directory inside PGDATA where a new cluster is built (pg_basebackup
/// or initdb) before it is moved into place. See `staging.rs`.
pub const STAGING_DIR: &str = ".pgentry-staging";

/// The major version pgentry runs.
pub const PG_MAJOR: &str = "15";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Staging {
    Absent,
    /// Building was interrupted: nothing in it is trustworthy.
    Incomplete,
    /// Building finished; only the move into PGDATA was interrupted.
    Complete,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    pub exists: bool,
    /// Top-level names in PGDATA other than the staging directory, sorted.
    pub entries: Vec<String>,
    pub staging: Staging,
    /// Content of PG_VERSION, trimmed; None when absent.
    pub version: Option<String>,
    /// The system identifier from global/pg_control; None when absent or short.
    pub system_identifier: Option<u64>,
    pub standby_signal: bool,
}

impl Facts {
    pub fn empty() -> Facts {
        Facts {
            exists: true,
            entries: Vec::new(),
            staging: Staging::Absent,
            version: None,
            system_identifier: None,
            standby_signal: false,
        }
    }
}

/// Why a data directory is left alone. Each names what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    ForeignFiles(Vec<String>),
    OtherVersion(String),
    IncompleteCluster,
    FormerPrimary,
    OtherSystem { local: u64, primary: u64 },
    IsStandby,
    StagingWithForeignFiles(Vec<String>),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let few = |names: &[String]| {
            let mut s = names.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
            if names.len() > 5 {
                s.push_str(", ...");
            }
            s
        };
        match self {
            Refusal::ForeignFiles(names) => write!(
                f,
                "PGDATA holds files that are not a PostgreSQL cluster ({}); point PGDATA at an empty directory or a subdirectory, or move them away",
                few(names)
            ),
            Refusal::OtherVersion(v) => write!(
                f,
                "PGDATA holds a PostgreSQL {v} cluster, not {PG_MAJOR}; upgrade it with pg_upgrade or use another volume"
            ),
            Refusal::IncompleteCluster => write!(
                f,
                "PGDATA has PG_VERSION but no global/pg_control: it is not a complete cluster; restore it from a backup or empty the directory"
            ),
            Refusal::FormerPrimary => write!(
                f,
                "PGDATA holds a cluster that is not a standby (a former primary?); rewind it with pg_rewind or empty the directory to clone afresh"
            ),
            Refusal::OtherSystem { local, primary } => write!(
                f,
                "PGDATA is a standby of database system {local}, but the primary is system {primary}; empty the directory to clone the new primary"
            ),
            Refusal::IsStandby => write!(
                f,
                "PGDATA holds a standby (standby.signal), but the role is primary; promote it with pg_ctl promote, or remove standby.signal on purpose"
            ),
            Refusal::StagingWithForeignFiles(names) => write!(
                f,
                "PGDATA holds an interrupted pgentry build ({STAGING_DIR}) next to other files ({}); move those files away",
                few(names)
            ),
        }
    }
}

impl std::error::Error for Refusal {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaAction {
    /// Nothing there: clone from the primary.
    Clone,
    /// An interrupted clone: discard the staging directory, then clone.
    DiscardAndClone,
    /// The clone finished but its move into PGDATA did not: finish the move.
    FinishStaging,
    /// A complete standby: (re)configure and start it.
    Start,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrimaryAction {
    Initdb,
    DiscardAndInitdb,
    FinishStaging,
    /// An existing cluster (ours, the official image's or plain initdb's): keep it.
    Adopt,
}

/// What the directory holds, judged without the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Content {
    Nothing,
    InterruptedBuild,
    FinishedBuild,
    Standby,
    Cluster,
}

fn classify(facts: &Facts) -> Result<Content, Refusal> {
    if !facts.exists {
        return Ok(Content::Nothing);
    }
    match facts.staging {
        Staging::Complete => return Ok(Content::FinishedBuild),
        Staging::Incomplete if facts.entries.is_empty() => return Ok(Content::InterruptedBuild),
        Staging::Incomplete => return Err(Refusal::StagingWithForeignFiles(facts.entries.clone())),
        Staging::Absent => {}
    }
    match &facts.version {
        None if facts.entries.is_empty() => Ok(Content::Nothing),
        None => Err(Refusal::ForeignFiles(facts.entries.clone())),
        Some(v) if v != PG_MAJOR => Err(Refusal::OtherVersion(v.clone())),
        Some(_) if facts.system_identifier.is_none() => Err(Refusal::IncompleteCluster),
        Some(_) if facts.standby_signal => Ok(Content::Standby),
        Some(_) => Ok(Content::Cluster),
    }
}

/// The replica's decision. `primary_system` is the primary's system identifier when
/// it answered; a standby of another system is refused, but a standby whose primary
/// is down is started (a hot standby keeps serving reads).
pub fn decide_replica(
    facts: &Facts,
    primary_system: Option<u64>,
) -> Result<ReplicaAction, Refusal> {
    match classify(facts)? {
        Content::Nothing => Ok(ReplicaAction::Clone),
        Content::InterruptedBuild => Ok(ReplicaAction::DiscardAndClone),
        Content::FinishedBuild => Ok(ReplicaAction::FinishStaging),
        Content::Cluster => Err(Refusal::FormerPrimary),
        Content::Standby => match (facts.system_identifier, primary_system) {
            (Some(local), Some(primary)) if local != primary => {
                Err(Refusal::OtherSystem { local, primary })
            }
            _ => Ok(ReplicaAction::Start),
        },
    }
}

pub fn decide_primary(facts: &Facts) -> Result<PrimaryAction, Refusal> {
    match classify(facts)? {
        Content::Nothing => Ok(PrimaryAction::Initdb),
        Content::InterruptedBuild => Ok(PrimaryAction::DiscardAndInitdb),
        Content::FinishedBuild => Ok(PrimaryAction::FinishStaging),
        Content::Standby => Err(Refusal::IsStandby),
        Content::Cluster => Ok(PrimaryAction::Adopt),
    }
}

/// Whether the local standby needs the primary's identity before it may start: only
/// a complete standby does; everything else either clones (and so talks to the
/// primary anyway) or is refused without it.
pub fn is_standby(facts: &Facts) -> bool {
    classify(facts) == Ok(Content::Standby)
}

/// Reads the facts of `pgdata`. A missing directory is a fact, not an error.
pub fn inspect(pgdata: &Path) -> io::Result<Facts> {
    let dir = match std::fs::read_dir(pgdata) {
        Ok(dir) => dir,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(Facts {
                exists: false,
                ..Facts::empty()
            })
        }
        Err(e) => return Err(e),
    };
    let mut entries = Vec::new();
    for entry in dir {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name != STAGING_DIR {
            entries.push(name);
        }
    }
    entries.sort();
    let staging_dir = pgdata.join(STAGING_DIR);
    let staging = if !staging_dir.exists() {
        Staging::Absent
    } else if staging_dir.join(crate::staging::COMPLETE_MARKER).exists() {
        Staging::Complete
    } else {
        Staging::Incomplete
    };
    let version = read_optional(&pgdata.join("PG_VERSION"))?
        .map(|bytes| String::from_utf8_lossy(&bytes).trim().to_string());
    let system_identifier =
        read_optional(&pgdata.join("global/pg_control"))?.and_then(|b| system_identifier(&b));
    Ok(Facts {
        exists: true,
        standby_signal: entries.iter().any(|e| e == "standby.signal"),
        entries,
        staging,
        version,
        system_identifier,
    })
}

/// The system identifier is pg_control's first field, a native-endian uint64.
pub fn system_identifier(pg_control: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = pg_control.get(..8)?.try_into().ok()?;
    Some(u64::from_ne_bytes(bytes))
}

fn read_optional(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(standby: bool) -> Facts {
        let mut entries = vec!["PG_VERSION".to_string(), "base".into(), "global".into()];
        if standby {
            entries.push("standby.signal".into());
        }
        Facts {
            entries,
            version: Some("15".into()),
            system_identifier: Some(42),
            standby_signal: standby,
            ..Facts::empty()
        }
    }

    fn with_staging(mut f: Facts, s: Staging) -> Facts {
        f.staging = s;
        f
    }

    #[test]
    fn replica_decisions() {
        let missing = Facts {
            exists: false,
            ..Facts::empty()
        };
        assert_eq!(decide_replica(&missing, None), Ok(ReplicaAction::Clone));
        assert_eq!(
            decide_replica(&Facts::empty(), Some(1)),
            Ok(ReplicaAction::Clone)
        );
        assert_eq!(
            decide_replica(&with_staging(Facts::empty(), Staging::Incomplete), None),
            Ok(ReplicaAction::DiscardAndClone)
        );
        // A finished build part-way through its move: some entries already moved.
        let mut part = with_staging(Facts::empty(), Staging::Complete);
        part.entries = vec!["base".into()];
        assert_eq!(
            decide_replica(&part, None),
            Ok(ReplicaAction::FinishStaging)
        );
        assert_eq!(
            decide_replica(&cluster(true), None),
            Ok(ReplicaAction::Start)
        );
        assert_eq!(
            decide_replica(&cluster(true), Some(42)),
            Ok(ReplicaAction::Start)
        );
    }

    #[test]
    fn replica_refusals() {
        assert_eq!(
            decide_replica(&cluster(true), Some(7)),
            Err(Refusal::OtherSystem {
                local: 42,
                primary: 7
            })
        );
        assert_eq!(
            decide_replica(&cluster(false), Some(42)),
            Err(Refusal::FormerPrimary)
        );
        let foreign = Facts {
            entries: vec!["notes.txt".into()],
            ..Facts::empty()
        };
        assert_eq!(
            decide_replica(&foreign, None),
            Err(Refusal::ForeignFiles(vec!["notes.txt".into()]))
        );
        let mixed = with_staging(foreign, Staging::Incomplete);
        assert_eq!(
            decide_replica(&mixed, None),
            Err(Refusal::StagingWithForeignFiles(vec!["notes.txt".into()]))
        );
        let mut old = cluster(true);
        old.version = Some("14".into());
        assert_eq!(
            decide_replica(&old, None),
            Err(Refusal::OtherVersion("14".into()))
        );
        let mut torn = cluster(true);
        torn.system_identifier = None;
        assert_eq!(decide_replica(&torn, None), Err(Refusal::IncompleteCluster));
    }

    #[test]
    fn primary_decisions() {
        assert_eq!(decide_primary(&Facts::empty()), Ok(PrimaryAction::Initdb));
        assert_eq!(
            decide_primary(&with_staging(Facts::empty(), Staging::Incomplete)),
            Ok(PrimaryAction::DiscardAndInitdb)
        );
        assert_eq!(
            decide_primary(&with_staging(Facts::empty(), Staging::Complete)),
            Ok(PrimaryAction::FinishStaging)
        );
        assert_eq!(decide_primary(&cluster(false)), Ok(PrimaryAction::Adopt));
        assert_eq!(decide_primary(&cluster(true)), Err(Refusal::IsStandby));
        let foreign = Facts {
            entries: vec!["lost+found".into()],
            ..Facts::empty()
        };
        assert!(matches!(
            decide_primary(&foreign),
            Err(Refusal::ForeignFiles(_))
        ));
    }

    #[test]
    fn only_a_complete_standby_asks_the_primary() {
        assert!(is_standby(&cluster(true)));
        assert!(!is_standby(&cluster(false)));
        assert!(!is_standby(&Facts::empty()));
    }

    #[test]
    fn refusals_name_a_remedy_on_one_line() {
        let all = [
            Refusal::ForeignFiles((0..7).map(|i| i.to_string()).collect()),
            Refusal::OtherVersion("14".into()),
            Refusal::IncompleteCluster,
            Refusal::FormerPrimary,
            Refusal::OtherSystem {
                local: 1,
                primary: 2,
            },
            Refusal::IsStandby,
            Refusal::StagingWithForeignFiles(vec!["x".into()]),
        ];
        for r in all {
            let text = r.to_string();
            assert!(!text.contains('\n'));
            assert!(text.contains(';'), "{text}");
        }
    }

    #[test]
    fn reads_the_system_identifier() {
        let mut control = 0x0123_4567_89ab_cdefu64.to_ne_bytes().to_vec();
        control.extend([0; 8]);
        assert_eq!(system_identifier(&control), Some(0x0123_4567_89ab_cdef));
        assert_eq!(system_identifier(&[1, 2]), None);
    }
}
