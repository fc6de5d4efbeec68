//! The linkage key: for each of a node's people, the identifier agencies share (the SSN in
//! practice), so that journey queries can find the same person at two agencies. It is supplied
//! by the steward (`cxfed linkage ingest`), validated, and kept only **keyed**; it is never a
//! column of any table, never queryable, never logged, and never sent anywhere by this module.
//!
//! # Input
//! A CSV file with the header `person_id,ssn`, one line per person: `person_id` is the node's
//! pseudonym of the person, exactly as in its `experience` and `operational` rows (free text, as
//! there), and `ssn` is nine digits, plain (`123456789`) or dashed (`123-45-6789`), the two
//! forms being the same SSN. Refused, each as `FILE:LINE:COLUMN: reason` (lines as an editor
//! shows them, as [`crate::ingest`] counts them), with nothing written:
//! - a header other than `person_id,ssn`, a row with another number of fields;
//! - an empty or bad `person_id`;
//! - an `ssn` not in either form, or of a form the SSA never issues: area number (the first
//!   three digits) 000, 666 or 900–999, group number (the middle two) 00, serial number (the
//!   last four) 0000, and the two published sample numbers 078-05-1120 and 219-09-9999;
//! - two SSNs for one person, or one SSN for two persons — within the file, or against what the
//!   node already holds (the same pair again is not an error: it is counted and skipped).
//!
//! No message ever shows an SSN, whole or in part: a reason names the rule broken and the
//! *lines* involved, never the digits.
//!
//! # At rest
//! Each SSN is stored as HMAC-SHA256 under the federation's linkage key (`<data_dir>/linkage.key`,
//! 32 random bytes in hex, mode 0600, made once per federation by `cxfed linkage keygen` and
//! installed by every steward; a node never makes one itself, since keyed values only match
//! across nodes under the same key), with a domain-separation prefix. A plain or salted hash
//! would not do: there are only about 10⁹ SSNs, so whoever holds the hash and the salt recovers
//! every SSN by enumeration in minutes; an HMAC cannot be enumerated without the key.
//!
//! The store is `<data_dir>/linkage.keyed` (mode 0600), outside the table directories that the
//! query engine lists ([`crate::engine`] registers only `experience` and `operational`):
//! ```text
//! cxfed-linkage 1 key-id <16 hex digits>
//! <person_id>\t<64 hex digits: HMAC-SHA256(key, "cxfed linkage ssn v1" 0x00 <9 digits>)>
//! ...                                                   (sorted by person_id)
//! ```
//! The key id (a keyed hash of a constant) tells which key the values are under without saying
//! anything about the key: an ingest under another key is refused, since it would silently make
//! the same person two. Every ingest validates the whole file, then writes the merged store to a
//! temporary file and renames it over the old one: a bad file, a conflict or a crash leaves the
//! previous store as it was.
//!
//! # On the wire (the journeys protocol, not in this module)
//! A keyed value is still a stable identifier of a person across the federation, so it is never
//! sent as is either: the private-intersection protocol maps it to a ristretto255 point
//! (hash-to-group, domain-separated) and multiplies it by a secret scalar drawn fresh for every
//! run (DH / ECDH PSI), so a peer sees only points it cannot invert or test guesses against.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use ring::hmac;

use crate::ingest::{
    IngestError, LineReader, MAX_LISTED_ERRORS, RecordLines, RowError, free_text_problem,
    next_record,
};

/// The federation's linkage key, inside a node's data directory.
pub const KEY_FILE: &str = "linkage.key";
/// The node's keyed linkage store, inside its data directory.
pub const STORE_FILE: &str = "linkage.keyed";
/// The header of a linkage CSV.
pub const HEADER: [&str; 2] = ["person_id", "ssn"];

const STORE_MAGIC: &str = "cxfed-linkage 1";
const SSN_DOMAIN: &[u8] = b"cxfed linkage ssn v1";
const KEY_ID_DOMAIN: &[u8] = b"cxfed linkage key id v1";

/// Published sample numbers (as nine digits) that were never a person's.
const SAMPLE_SSNS: [u32; 2] = [78_051_120, 219_099_999];

/// An SSN known to be of a form the SSA issues, as its nine digits. Never printed: `Debug`
/// writes `Ssn(<redacted>)`, and there is no `Display`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ssn(u32);

impl fmt::Debug for Ssn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Ssn(<redacted>)")
    }
}

/// Why a value is not an SSN. The reasons never quote the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SsnProblem {
    /// Not nine digits, plain or as `DDD-DD-DDDD`.
    Form,
    /// Area number 000.
    Area000,
    /// Area number 666.
    Area666,
    /// Area number 900–999.
    Area900,
    /// Group number 00.
    Group00,
    /// Serial number 0000.
    Serial0000,
    /// A published sample number.
    Sample,
}

impl fmt::Display for SsnProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SsnProblem::Form => {
                "not an SSN: expected nine digits, plain or as DDD-DD-DDDD (the value is not shown)"
            }
            SsnProblem::Area000 => "area number (the first three digits) 000 is never issued",
            SsnProblem::Area666 => "area number (the first three digits) 666 is never issued",
            SsnProblem::Area900 => "area numbers (the first three digits) 900-999 are never issued",
            SsnProblem::Group00 => "group number (digits 4-5) 00 is never issued",
            SsnProblem::Serial0000 => "serial number (the last four digits) 0000 is never issued",
            SsnProblem::Sample => "a published sample number (as in advertising), not a person's",
        })
    }
}

impl Ssn {
    /// Parses `DDDDDDDDD` or `DDD-DD-DDDD` and checks that the SSA issues numbers of that form.
    pub fn parse(b: &[u8]) -> Result<Ssn, SsnProblem> {
        let digits: [u8; 9] = match b.len() {
            9 => b.try_into().map_err(|_| SsnProblem::Form)?,
            11 if b[3] == b'-' && b[6] == b'-' => {
                let mut d = [0u8; 9];
                d[..3].copy_from_slice(&b[..3]);
                d[3..5].copy_from_slice(&b[4..6]);
                d[5..].copy_from_slice(&b[7..]);
                d
            }
            _ => return Err(SsnProblem::Form),
        };
        let mut n = 0u32;
        for c in digits {
            let d = c.wrapping_sub(b'0');
            if d > 9 {
                return Err(SsnProblem::Form);
            }
            n = n * 10 + u32::from(d);
        }
        let (area, group, serial) = (n / 1_000_000, n / 10_000 % 100, n % 10_000);
        match area {
            0 => return Err(SsnProblem::Area000),
            666 => return Err(SsnProblem::Area666),
            900.. => return Err(SsnProblem::Area900),
            _ => {}
        }
        if group == 0 {
            return Err(SsnProblem::Group00);
        }
        if serial == 0 {
            return Err(SsnProblem::Serial0000);
        }
        if SAMPLE_SSNS.contains(&n) {
            return Err(SsnProblem::Sample);
        }
        Ok(Ssn(n))
    }

    /// The nine digits, for writing synthetic files (`DDD-DD-DDDD`).
    pub(crate) fn push_dashed(self, out: &mut Vec<u8>) {
        let d = format!("{:09}", self.0).into_bytes();
        out.extend_from_slice(&d[..3]);
        out.push(b'-');
        out.extend_from_slice(&d[3..5]);
        out.push(b'-');
        out.extend_from_slice(&d[5..]);
    }

    /// The SSN with these nine digits, if it is of an issued form.
    pub(crate) fn from_digits(n: u32) -> Option<Ssn> {
        Ssn::parse(format!("{n:09}").as_bytes()).ok()
    }
}

/// The federation's linkage key. `Debug` never shows it.
pub struct LinkageKey(hmac::Key);

impl fmt::Debug for LinkageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LinkageKey(<redacted>)")
    }
}

/// A keyed linkage value: HMAC-SHA256 of an SSN under the linkage key. `Debug` never shows it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Keyed(pub [u8; 32]);

impl fmt::Debug for Keyed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Keyed(<redacted>)")
    }
}

impl LinkageKey {
    /// A key from its 32 bytes.
    pub fn from_bytes(bytes: &[u8; 32]) -> LinkageKey {
        LinkageKey(hmac::Key::new(hmac::HMAC_SHA256, bytes))
    }

    /// Reads `path`: 64 hex digits (surrounding white space ignored). On Unix the file must not
    /// be readable or writable by group or others.
    pub fn load(path: &Path) -> io::Result<LinkageKey> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(io::Error::new(
                    e.kind(),
                    "no linkage key: make one for the whole federation with `cxfed linkage \
                     keygen --out FILE` and install the same file, mode 0600, as linkage.key in \
                     every node's data directory",
                ));
            }
            Err(e) => return Err(e),
        };
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(io::Error::other(format!(
                    "the linkage key is accessible to other users (mode {mode:04o}): run \
                     `chmod 600` on it (and treat the key as compromised if others could read it)"
                )));
            }
        }
        let bytes = cxfed_protocol::signing::unhex(text.trim())
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| io::Error::other("not a linkage key: expected 64 hex digits"))?;
        Ok(LinkageKey::from_bytes(&bytes))
    }

    /// The keyed value of an SSN.
    pub fn keyed(&self, ssn: Ssn) -> Keyed {
        let mut ctx = hmac::Context::with_key(&self.0);
        ctx.update(SSN_DOMAIN);
        ctx.update(&[0]);
        ctx.update(format!("{:09}", ssn.0).as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.sign().as_ref());
        Keyed(out)
    }

    /// The key's public identifier (16 hex digits): a keyed hash of a constant, which says which
    /// key values are under and nothing about the key.
    pub fn id(&self) -> String {
        let tag = hmac::sign(&self.0, KEY_ID_DOMAIN);
        cxfed_protocol::signing::hex(&tag.as_ref()[..8])
    }
}

/// Writes a new random linkage key to `path` (64 hex digits, mode 0600, atomically), refusing to
/// overwrite an existing file. Returns the key's id.
pub fn keygen(path: &Path) -> io::Result<String> {
    if path.exists() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists; a federation has one linkage key (a new one would unlink every \
                 stored person), so it is not overwritten",
                path.display()
            ),
        ));
    }
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| io::Error::other("random number generator failed"))?;
    let text = format!("{}\n", cxfed_protocol::signing::hex(&bytes));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    crate::storage::write_atomic(path, text.as_bytes(), true)?;
    Ok(LinkageKey::from_bytes(&bytes).id())
}

/// What a linkage ingest did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkageReport {
    /// Persons whose keyed SSN was added.
    pub added: u64,
    /// Lines whose person already had this SSN on this node.
    pub already_stored: u64,
    /// Lines repeating an earlier line of the file (same person, same SSN).
    pub repeated: u64,
    /// Persons in the store after the ingest.
    pub persons: u64,
    /// The store.
    pub path: PathBuf,
}

/// One line of a linkage file, valid on its own.
struct Entry {
    person: String,
    ssn: Ssn,
    line: u64,
}

/// Checks `file` as [`ingest`] does, without the key and without the node's store (so only
/// conflicts within the file are found). Returns the number of distinct persons.
pub fn validate(file: &Path) -> Result<u64, IngestError> {
    read(file).map(|entries| entries.len() as u64)
}

/// Validates `file` and adds its persons' keyed SSNs to `data_dir`'s store, atomically: on any
/// error the store is left as it was. Needs the federation's key in `data_dir`.
pub fn ingest(data_dir: &Path, file: &Path) -> Result<LinkageReport, IngestError> {
    let io_at = |path: &Path| {
        let path = path.to_path_buf();
        move |source| IngestError::Io { path, source }
    };
    let key_path = data_dir.join(KEY_FILE);
    let key = LinkageKey::load(&key_path).map_err(io_at(&key_path))?;
    let entries = read(file)?;
    let store_path = data_dir.join(STORE_FILE);
    let mut store = Store::load(&store_path, &key.id()).map_err(io_at(&store_path))?;
    let by_value: HashMap<Keyed, &str> = store
        .persons
        .iter()
        .map(|(p, k)| (*k, p.as_str()))
        .collect();

    let mut errors = Vec::new();
    let mut new: Vec<(String, Keyed)> = Vec::new();
    let mut already_stored = 0u64;
    for e in entries.iter() {
        let keyed = key.keyed(e.ssn);
        match (store.persons.get(&e.person), by_value.get(&keyed)) {
            (Some(k), _) if *k == keyed => already_stored += 1,
            (Some(_), _) => errors.push(RowError {
                line: e.line,
                column: 2,
                reason: format!(
                    "ssn: person_id {:?} already has another ssn on this node (a person has one \
                     SSN)",
                    e.person
                ),
            }),
            (None, Some(other)) => errors.push(RowError {
                line: e.line,
                column: 2,
                reason: format!(
                    "ssn: this node already holds the same ssn for person_id {other:?} (an SSN \
                     is one person's)"
                ),
            }),
            (None, None) => new.push((e.person.clone(), keyed)),
        }
    }
    if !errors.is_empty() {
        let total = errors.len() as u64;
        errors.truncate(MAX_LISTED_ERRORS);
        return Err(IngestError::Invalid {
            file: file.to_path_buf(),
            errors,
            total,
        });
    }
    drop(by_value);
    let added = new.len() as u64;
    let repeated = entries.repeated;
    if added > 0 {
        store.persons.extend(new);
        store.save(&store_path).map_err(io_at(&store_path))?;
    }
    tracing::info!(
        added,
        already_stored,
        repeated,
        persons = store.persons.len(),
        "linkage keys ingested"
    );
    Ok(LinkageReport {
        added,
        already_stored,
        repeated,
        persons: store.persons.len() as u64,
        path: store_path,
    })
}

/// The keyed linkage values this node holds, by person.
pub fn load(data_dir: &Path, key: &LinkageKey) -> io::Result<BTreeMap<String, Keyed>> {
    Ok(Store::load(&data_dir.join(STORE_FILE), &key.id())?.persons)
}

/// Distinct valid entries of a file, and how many lines repeated an earlier one.
struct Entries {
    list: Vec<Entry>,
    repeated: u64,
}

impl std::ops::Deref for Entries {
    type Target = [Entry];
    fn deref(&self) -> &[Entry] {
        &self.list
    }
}

/// Problems found in a file, in file order: the first [`MAX_LISTED_ERRORS`] kept, all counted.
#[derive(Default)]
struct Found {
    list: Vec<RowError>,
    total: u64,
}

impl Found {
    fn add(&mut self, line: u64, column: usize, reason: String) {
        self.total += 1;
        if self.list.len() < MAX_LISTED_ERRORS {
            self.list.push(RowError {
                line,
                column,
                reason,
            });
        }
    }

    fn into_result(self, file: &Path) -> Result<(), IngestError> {
        if self.total == 0 {
            return Ok(());
        }
        Err(IngestError::Invalid {
            file: file.to_path_buf(),
            errors: self.list,
            total: self.total,
        })
    }
}

/// Whether `b` has the form of an SSN (nine digits, plain or dashed), valid or not.
fn looks_like_ssn(b: &[u8]) -> bool {
    !matches!(Ssn::parse(b), Err(SsnProblem::Form))
}

/// Reads and checks a linkage file: every line on its own, then conflicts within the file.
fn read(file: &Path) -> Result<Entries, IngestError> {
    let input = std::fs::File::open(file).map_err(|source| IngestError::Io {
        path: file.to_path_buf(),
        source,
    })?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(LineReader::new(input));
    let mut raw = csv::ByteRecord::new();
    let mut lines = RecordLines::default();
    let mut found = Found::default();
    let expected = HEADER.join(",");
    if !next_record(&mut reader, &mut raw, &mut lines, file)? {
        found.add(
            1,
            1,
            format!("the file is empty; expected the header line {expected}"),
        );
    } else {
        let names: Vec<&[u8]> = raw
            .iter()
            .enumerate()
            .map(|(i, h)| match i {
                0 => h.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(h),
                _ => h,
            })
            .collect();
        let wrong = names
            .iter()
            .zip(HEADER)
            .position(|(h, w)| *h != w.as_bytes())
            .or((names.len() != HEADER.len()).then_some(names.len().min(HEADER.len())));
        if let Some(i) = wrong {
            found.add(
                lines.field(i),
                i + 1,
                format!("the header must be exactly: {expected}"),
            );
        }
    }
    found.into_result(file)?;

    let mut found = Found::default();
    let mut list: Vec<Entry> = Vec::new();
    // Person -> (SSN, line); SSN -> index in `list`.
    let mut by_person: HashMap<String, (Ssn, u64)> = HashMap::new();
    let mut by_ssn: HashMap<Ssn, usize> = HashMap::new();
    let mut repeated = 0u64;
    while next_record(&mut reader, &mut raw, &mut lines, file)? {
        let n = HEADER.len();
        if raw.len() != n {
            let got = raw.len();
            found.add(
                lines.field(got.min(n).saturating_sub(1)),
                got.min(n) + 1,
                format!(
                    "the row has {got} field{} but the header has {n}",
                    if got == 1 { "" } else { "s" }
                ),
            );
            continue;
        }
        let (person_raw, ssn_raw) = (&raw[0], &raw[1]);
        let person = if looks_like_ssn(person_raw) {
            found.add(
                lines.field(0),
                1,
                "person_id: looks like an SSN (the value is not shown); person_id must be the \
                 node's pseudonym of the person, as in its experience and operational rows"
                    .into(),
            );
            None
        } else if let Some(reason) = free_text_problem(HEADER[0], person_raw) {
            found.add(lines.field(0), 1, reason);
            None
        } else {
            std::str::from_utf8(person_raw).ok().map(str::to_string)
        };
        let ssn = match Ssn::parse(ssn_raw) {
            Ok(ssn) => Some(ssn),
            Err(_) if ssn_raw.is_empty() => {
                found.add(lines.field(1), 2, "ssn: required value is empty".into());
                None
            }
            Err(p) => {
                found.add(lines.field(1), 2, format!("ssn: {p}"));
                None
            }
        };
        let (Some(person), Some(ssn)) = (person, ssn) else {
            continue;
        };
        let line = lines.field(1);
        match by_person.get(&person) {
            Some((s, _)) if *s == ssn => {
                repeated += 1;
                continue;
            }
            Some((_, first)) => {
                found.add(
                    line,
                    2,
                    format!(
                        "ssn: person_id {person:?} already has another ssn on line {first} (a \
                         person has one SSN)"
                    ),
                );
                continue;
            }
            None => {}
        }
        if let Some(&i) = by_ssn.get(&ssn) {
            let other = &list[i];
            found.add(
                line,
                2,
                format!(
                    "ssn: the same ssn is given on line {} for person_id {:?} (an SSN is one \
                     person's)",
                    other.line, other.person
                ),
            );
            continue;
        }
        by_person.insert(person.clone(), (ssn, line));
        by_ssn.insert(ssn, list.len());
        list.push(Entry { person, ssn, line });
    }
    if reader.get_ref().quotes_unbalanced() && found.total == 0 {
        found.add(
            lines.first(),
            1,
            "unbalanced '\"': a quoted field is not closed before the end of the file".into(),
        );
    }
    found.into_result(file)?;
    Ok(Entries { list, repeated })
}

/// The keyed store on disk.
struct Store {
    persons: BTreeMap<String, Keyed>,
    key_id: String,
}

impl Store {
    /// Reads `path` (absent: empty), refusing values under another key.
    fn load(path: &Path, key_id: &str) -> io::Result<Store> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(Store {
                    persons: BTreeMap::new(),
                    key_id: key_id.to_string(),
                });
            }
            Err(e) => return Err(e),
        };
        let bad = |n: usize, why: &str| {
            io::Error::other(format!("line {}: {why}; the store is damaged", n + 1))
        };
        let mut lines = text.lines().enumerate();
        let header = lines.next().map(|(_, l)| l).unwrap_or("");
        let stored_id = header
            .strip_prefix(STORE_MAGIC)
            .and_then(|r| r.strip_prefix(" key-id "))
            .ok_or_else(|| bad(0, "not a cxfed linkage store"))?;
        if stored_id != key_id {
            return Err(io::Error::other(format!(
                "the stored values are under linkage key {stored_id}, but linkage.key is key \
                 {key_id}: install the federation's key the store was made with"
            )));
        }
        let mut persons = BTreeMap::new();
        for (n, l) in lines {
            let (person, hex) = l.split_once('\t').ok_or_else(|| bad(n, "no tab"))?;
            let value = cxfed_protocol::signing::unhex(hex)
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| bad(n, "not a keyed value"))?;
            persons.insert(person.to_string(), Keyed(value));
        }
        Ok(Store {
            persons,
            key_id: key_id.to_string(),
        })
    }

    /// Writes the store atomically, mode 0600.
    fn save(&self, path: &Path) -> io::Result<()> {
        let mut text = format!("{STORE_MAGIC} key-id {}\n", self.key_id);
        text.reserve(self.persons.len() * 100);
        for (person, keyed) in &self.persons {
            text.push_str(person);
            text.push('\t');
            text.push_str(&cxfed_protocol::signing::hex(&keyed.0));
            text.push('\n');
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        crate::storage::write_atomic(path, text.as_bytes(), true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Held by every test that ingests: tracing caches per call site whether anyone listens,
    /// so an ingest on another thread while `neither_ssns_nor_keyed_values_are_logged`
    /// installs its subscriber could leave that test's log empty.
    static SERIAL: Mutex<()> = Mutex::new(());

    fn serial() -> std::sync::MutexGuard<'static, ()> {
        SERIAL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// SSNs used below, plain; none may ever appear in a message, a log or the store.
    const GOOD: [&str; 4] = ["123456781", "234567812", "345678123", "456781234"];

    fn dir_with_key() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        std::fs::create_dir(&data).expect("mkdir");
        keygen(&data.join(KEY_FILE)).expect("keygen");
        (tmp, data)
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    fn located(err: IngestError) -> Vec<(u64, usize, String)> {
        match err {
            IngestError::Invalid { errors, .. } => errors
                .into_iter()
                .map(|e| (e.line, e.column, e.reason))
                .collect(),
            other => panic!("expected Invalid, got {other}"),
        }
    }

    /// Every nine-digit run in `text` (plain or dashed) — none may be an SSN of the inputs.
    fn assert_no_ssn(text: &str, ssns: &[&str]) {
        for s in ssns {
            let dashed = format!("{}-{}-{}", &s[..3], &s[3..5], &s[5..]);
            assert!(!text.contains(s), "{s} appears in:\n{text}");
            assert!(!text.contains(&dashed), "{dashed} appears in:\n{text}");
        }
    }

    #[test]
    fn ssn_forms_and_never_issued_numbers() {
        let plain = Ssn::parse(b"123456781").expect("plain");
        assert_eq!(Ssn::parse(b"123-45-6781"), Ok(plain));
        assert_eq!(format!("{plain:?}"), "Ssn(<redacted>)");
        for (v, p) in [
            (&b"12345678"[..], SsnProblem::Form),
            (b"1234567890", SsnProblem::Form),
            (b"123-456-781", SsnProblem::Form),
            (b"123 45 6781", SsnProblem::Form),
            (b" 123456781", SsnProblem::Form),
            (b"12345678a", SsnProblem::Form),
            (b"000-12-3456", SsnProblem::Area000),
            (b"666123456", SsnProblem::Area666),
            (b"900-12-3456", SsnProblem::Area900),
            (b"999123456", SsnProblem::Area900),
            (b"123-00-4567", SsnProblem::Group00),
            (b"123-45-0000", SsnProblem::Serial0000),
            (b"078-05-1120", SsnProblem::Sample),
            (b"219099999", SsnProblem::Sample),
        ] {
            assert_eq!(Ssn::parse(v), Err(p), "{}", String::from_utf8_lossy(v));
        }
        for ok in ["001-01-0001", "665999999", "899-99-9999", "667010001"] {
            assert!(Ssn::parse(ok.as_bytes()).is_ok(), "{ok}");
        }
        let mut out = Vec::new();
        plain.push_dashed(&mut out);
        assert_eq!(out, b"123-45-6781");
        assert_eq!(Ssn::from_digits(123_456_781), Some(plain));
        assert_eq!(Ssn::from_digits(666_000_001), None);
    }

    #[test]
    fn each_problem_is_located_and_no_message_shows_an_ssn() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let bad = [
            "000-11-2222",
            "666-11-2222",
            "912-11-2222",
            "123-00-2222",
            "123-11-0000",
            "12-345-6789",
            "078-05-1120",
        ];
        let text = format!(
            "person_id,ssn\n\
             SSA-P-1,{g0}\n\
             SSA-P-2,{b0}\n\
             SSA-P-3,{b1}\n\
             SSA-P-4,{b2}\n\
             SSA-P-5,{b3}\n\
             SSA-P-6,{b4}\n\
             SSA-P-7,{b5}\n\
             SSA-P-8,{b6}\n\
             SSA-P-9,\n\
             ,{g1}\n\
             SSA-P-1,{g2}\n\
             SSA-P-10,{g0d}\n\
             SSA-P-11,{g3},extra\n\
             {g1},{g3}\n\
             SSA-P-12\n\
             SSA-P-1,{g0}\n",
            g0 = GOOD[0],
            g1 = GOOD[1],
            g2 = GOOD[2],
            g3 = GOOD[3],
            g0d = "123-45-6781",
            b0 = bad[0],
            b1 = bad[1],
            b2 = bad[2],
            b3 = bad[3],
            b4 = bad[4],
            b5 = bad[5],
            b6 = bad[6],
        );
        let file = write(tmp.path(), "linkage.csv", &text);
        let err = validate(&file).expect_err("invalid");
        let shown = err.to_string();
        let got = located(err);
        let want: Vec<(u64, usize, &str)> = vec![
            (
                3,
                2,
                "ssn: area number (the first three digits) 000 is never issued",
            ),
            (
                4,
                2,
                "ssn: area number (the first three digits) 666 is never issued",
            ),
            (
                5,
                2,
                "ssn: area numbers (the first three digits) 900-999 are never issued",
            ),
            (6, 2, "ssn: group number (digits 4-5) 00 is never issued"),
            (
                7,
                2,
                "ssn: serial number (the last four digits) 0000 is never issued",
            ),
            (
                8,
                2,
                "ssn: not an SSN: expected nine digits, plain or as DDD-DD-DDDD",
            ),
            (9, 2, "ssn: a published sample number"),
            (10, 2, "ssn: required value is empty"),
            (11, 1, "person_id: required value is empty"),
            (
                12,
                2,
                "ssn: person_id \"SSA-P-1\" already has another ssn on line 2",
            ),
            (
                13,
                2,
                "ssn: the same ssn is given on line 2 for person_id \"SSA-P-1\"",
            ),
            (14, 3, "the row has 3 fields but the header has 2"),
            (15, 1, "person_id: looks like an SSN"),
            (16, 2, "the row has 1 field but the header has 2"),
        ];
        assert_eq!(got.len(), want.len(), "{shown}");
        for ((line, col, reason), (wl, wc, wr)) in got.iter().zip(&want) {
            assert_eq!((*line, *col), (*wl, *wc), "{reason}");
            assert!(reason.starts_with(wr), "line {line}: {reason}");
        }
        let f = file.display().to_string();
        assert!(
            shown.contains(&format!("{f}:12:2: ssn: person_id")),
            "{shown}"
        );
        assert!(
            shown.ends_with("14 errors; nothing was ingested"),
            "{shown}"
        );
        let mut all = GOOD.to_vec();
        all.extend(bad.iter().copied());
        let plain: Vec<String> = all.iter().map(|s| s.replace('-', "")).collect();
        assert_no_ssn(
            &shown,
            &plain.iter().map(String::as_str).collect::<Vec<_>>(),
        );
    }

    #[test]
    fn header_and_empty_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        for (text, line, col) in [
            ("", 1, 1),
            ("person_id,SSN\nSSA-P-1,123456781\n", 1, 2),
            ("ssn,person_id\n", 1, 1),
            ("person_id\n", 1, 2),
            ("person_id,ssn,state\n", 1, 3),
            ("\n\nperson_id,social\n", 3, 2),
        ] {
            let file = write(tmp.path(), "h.csv", text);
            let got = located(validate(&file).expect_err(text));
            assert_eq!(got.len(), 1, "{text:?}: {got:?}");
            assert_eq!((got[0].0, got[0].1), (line, col), "{text:?}: {got:?}");
        }
        // A byte order mark and CRLF line ends are fine; errors name the editor's line.
        let file = write(
            tmp.path(),
            "bom.csv",
            "\u{feff}person_id,ssn\r\nSSA-P-1,123456781\r\n\r\nSSA-P-2,1234\r\n",
        );
        let got = located(validate(&file).expect_err("bad"));
        assert_eq!((got[0].0, got[0].1), (4, 2), "{got:?}");
    }

    #[test]
    fn ingest_stores_only_keyed_values_mode_0600_and_skips_what_it_holds() {
        let _serial = serial();
        let (tmp, data) = dir_with_key();
        let text = format!(
            "person_id,ssn\nSSA-P-2,{}\nSSA-P-1,{}\nSSA-P-1,{}\nSSA-P-3,{}\n",
            GOOD[0], GOOD[1], GOOD[1], "345-67-8123"
        );
        let file = write(tmp.path(), "l.csv", &text);
        let r = ingest(&data, &file).expect("ingest");
        assert_eq!(
            (r.added, r.already_stored, r.repeated, r.persons),
            (3, 0, 1, 3)
        );
        let stored = std::fs::read_to_string(&r.path).expect("read");
        assert_no_ssn(&stored, &GOOD);
        // Neither a plain hash of the digits (enumerable) nor the digits themselves.
        for s in GOOD {
            let sha = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
            assert!(!stored.contains(&cxfed_protocol::signing::hex(sha.as_ref())));
        }
        let lines: Vec<&str> = stored.lines().collect();
        assert!(lines[0].starts_with("cxfed-linkage 1 key-id "), "{stored}");
        assert_eq!(lines.len(), 4);
        assert!(lines[1].starts_with("SSA-P-1\t") && lines[3].starts_with("SSA-P-3\t"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&r.path)
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Dashed and plain are the same SSN; the keyed values are those of the key.
        let key = LinkageKey::load(&data.join(KEY_FILE)).expect("key");
        let held = load(&data, &key).expect("load");
        assert_eq!(
            held.get("SSA-P-3"),
            Some(&key.keyed(Ssn::parse(b"345678123").expect("ssn")))
        );
        // The same file again adds nothing and leaves the store as it was.
        let again = ingest(&data, &file).expect("again");
        assert_eq!((again.added, again.already_stored), (0, 3));
        assert_eq!(std::fs::read_to_string(&r.path).expect("read"), stored);
        // A new person is added beside them.
        let more = write(
            tmp.path(),
            "m.csv",
            &format!("person_id,ssn\nSSA-P-4,{}\n", GOOD[3]),
        );
        assert_eq!(ingest(&data, &more).expect("more").persons, 4);
    }

    #[test]
    fn a_bad_or_conflicting_file_leaves_the_store_as_it_was() {
        let _serial = serial();
        let (tmp, data) = dir_with_key();
        let first = write(
            tmp.path(),
            "a.csv",
            &format!("person_id,ssn\nSSA-P-1,{}\nSSA-P-2,{}\n", GOOD[0], GOOD[1]),
        );
        ingest(&data, &first).expect("first");
        let store = data.join(STORE_FILE);
        let before = std::fs::read(&store).expect("read");
        let listing = |d: &Path| {
            let mut v: Vec<_> = std::fs::read_dir(d)
                .expect("list")
                .map(|e| e.expect("entry").file_name())
                .collect();
            v.sort();
            v
        };
        let files_before = listing(&data);
        for (name, text, line, reason) in [
            (
                "bad.csv",
                format!("person_id,ssn\nSSA-P-3,{}\nSSA-P-4,666-12-3456\n", GOOD[2]),
                3,
                "ssn: area number",
            ),
            (
                "other-ssn.csv",
                format!("person_id,ssn\nSSA-P-3,{}\nSSA-P-1,{}\n", GOOD[2], GOOD[3]),
                3,
                "ssn: person_id \"SSA-P-1\" already has another ssn on this node",
            ),
            (
                "other-person.csv",
                format!("person_id,ssn\nSSA-P-9,{}\n", GOOD[1]),
                2,
                "ssn: this node already holds the same ssn for person_id \"SSA-P-2\"",
            ),
        ] {
            let file = write(tmp.path(), name, &text);
            let err = ingest(&data, &file).expect_err(name);
            let shown = err.to_string();
            assert_no_ssn(&shown, &GOOD);
            let got = located(err);
            assert_eq!(got.len(), 1, "{name}: {got:?}");
            assert_eq!((got[0].0, got[0].1), (line, 2), "{name}: {got:?}");
            assert!(got[0].2.starts_with(reason), "{name}: {}", got[0].2);
            assert_eq!(std::fs::read(&store).expect("read"), before, "{name}");
            assert_eq!(
                listing(&data),
                files_before,
                "{name}: a file was left behind"
            );
        }
    }

    #[test]
    fn the_key_is_the_federations_and_kept_private() {
        let _serial = serial();
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        let file = write(
            tmp.path(),
            "l.csv",
            &format!("person_id,ssn\nP-1,{}\n", GOOD[0]),
        );
        // No key: refused with how to make one; nothing written, no key made.
        let err = ingest(&data, &file).expect_err("no key").to_string();
        assert!(err.contains("cxfed linkage keygen"), "{err}");
        assert!(!data.exists());
        std::fs::create_dir(&data).expect("mkdir");
        let key_path = data.join(KEY_FILE);
        let id = keygen(&key_path).expect("keygen");
        assert_eq!(id.len(), 16);
        assert!(keygen(&key_path).is_err(), "a key is never overwritten");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key_path)
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
            std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644))
                .expect("chmod");
            let err = ingest(&data, &file).expect_err("0644").to_string();
            assert!(
                err.contains("mode 0644") && err.contains("chmod 600"),
                "{err}"
            );
            assert!(!data.join(STORE_FILE).exists());
            std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))
                .expect("chmod");
        }
        ingest(&data, &file).expect("ingest");
        // Another key (a node that made its own) cannot add to values under the first.
        std::fs::remove_file(&key_path).expect("rm");
        keygen(&key_path).expect("keygen");
        let before = std::fs::read(data.join(STORE_FILE)).expect("read");
        let err = ingest(&data, &file).expect_err("other key").to_string();
        assert!(err.contains(&format!("under linkage key {id}")), "{err}");
        assert_eq!(std::fs::read(data.join(STORE_FILE)).expect("read"), before);
        let key = LinkageKey::load(&key_path).expect("key");
        assert_eq!(format!("{key:?}"), "LinkageKey(<redacted>)");
        assert_eq!(
            format!("{:?}", key.keyed(Ssn(123_456_781))),
            "Keyed(<redacted>)"
        );
    }

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if let Ok(mut out) = self.0.lock() {
                out.extend_from_slice(buf);
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn neither_ssns_nor_keyed_values_are_logged() {
        let _serial = serial();
        let (tmp, data) = dir_with_key();
        let good = write(
            tmp.path(),
            "good.csv",
            &format!(
                "person_id,ssn\nP-1,{}\nP-2,{}\nP-3,{}\n",
                GOOD[0], GOOD[1], GOOD[2]
            ),
        );
        let bad = write(
            tmp.path(),
            "bad.csv",
            &format!("person_id,ssn\nP-4,{}\nP-1,{}\n", GOOD[3], GOOD[3]),
        );
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .finish();
        let mut shown = String::new();
        tracing::subscriber::with_default(subscriber, || {
            ingest(&data, &good).expect("good");
            shown.push_str(&ingest(&data, &bad).expect_err("bad").to_string());
            shown.push_str(&format!("{:?}", ingest(&data, &good)));
        });
        let log = String::from_utf8(captured.0.lock().expect("lock").clone()).expect("utf8");
        assert!(log.contains("linkage keys ingested"), "{log}");
        assert_no_ssn(&log, &GOOD);
        assert_no_ssn(&shown, &GOOD);
        let key = LinkageKey::load(&data.join(KEY_FILE)).expect("key");
        for s in GOOD {
            let keyed = key.keyed(Ssn::parse(s.as_bytes()).expect("ssn"));
            let hex = cxfed_protocol::signing::hex(&keyed.0);
            assert!(
                !log.contains(&hex[..16]),
                "a keyed value was logged:\n{log}"
            );
            assert!(
                !shown.contains(&hex[..16]),
                "a keyed value was shown:\n{shown}"
            );
        }
    }

    #[tokio::test]
    async fn the_linkage_key_is_not_in_the_catalog_and_queries_naming_it_are_refused() {
        let (tmp, data) = dir_with_key();
        let file = write(
            tmp.path(),
            "l.csv",
            &format!("person_id,ssn\nP-1,{}\n", GOOD[0]),
        );
        {
            let _serial = serial();
            ingest(&data, &file).expect("ingest");
        }
        let ctx = crate::engine::node_context(&data, 64 << 20).expect("context");
        let mut tables: Vec<String> = ctx
            .catalog_names()
            .into_iter()
            .filter_map(|c| ctx.catalog(&c))
            .flat_map(|c| {
                c.schema_names()
                    .into_iter()
                    .filter_map(move |s| c.schema(&s))
                    .flat_map(|s| s.table_names())
            })
            .collect();
        tables.sort();
        assert_eq!(tables, ["experience", "operational"]);
        for sql in [
            "SELECT count(*) FROM linkage",
            "SELECT count(*) FROM experience WHERE ssn = '123456781'",
            "SELECT agency, count(*) FROM operational GROUP BY agency, linkage_key",
        ] {
            match cxfed_queries::validate::approve(&ctx.state(), sql).await {
                Err(cxfed_queries::rules::QueryError::Rejected(r)) => {
                    assert_eq!(r.rule.code(), "CXF-Q012", "{sql}: {}", r.reason);
                }
                other => panic!("{sql}: {:?}", other.map(|q| q.sql().to_string())),
            }
        }
    }
}
