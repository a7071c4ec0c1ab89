//! A replica's raft state in memory: the mirror of what the member's log
//! holds for one group, rebuilt from those records after a restart.
//!
//! raft-rs reads its log through [`raft::Storage`]; the member's log is
//! one file sequence for every group, so the driver appends each
//! [`ReplicaWrite`] there and applies it here at the same moment. Entries
//! written but not yet fsynced are readable here (raft-rs may send them to
//! followers); they are only reported persisted after the sync.

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};

/// What a replica asks the member's log to hold, in the order given: a
/// crash may lose a suffix of these, never a middle.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplicaWrite {
    /// Entries from `entries[0].index` on replace whatever the log held
    /// from there (an uncommitted suffix a new leader overwrote).
    Entries(Vec<Entry>),
    HardState(HardState),
    /// The state machine as of the snapshot's index: everything before it
    /// is no longer needed.
    Snapshot(Snapshot),
    /// Entries before `index` are no longer needed (a snapshot at or after
    /// it is held by this replica's state machine).
    Compact {
        index: u64,
    },
}

/// One group's raft log and hard state, in memory.
#[derive(Debug, Clone, Default)]
pub struct GroupStorage {
    hard_state: HardState,
    conf_state: ConfState,
    /// The last snapshot taken or installed (its data is the group's state
    /// machine, in the engine's snapshot encoding).
    snapshot: Snapshot,
    /// Entries after the snapshot's index, contiguous.
    entries: Vec<Entry>,
    /// Bytes of the entries' data (kept as they change: the driver asks
    /// every tick whether a snapshot is due).
    entry_bytes: u64,
}

fn data_bytes(entries: &[Entry]) -> u64 {
    entries.iter().map(|entry| entry.data.len() as u64).sum()
}

impl GroupStorage {
    /// A group's first start: every voter named, nothing written.
    pub fn initial(voters: &[u64]) -> Self {
        let mut storage = Self::default();
        storage.conf_state.voters = voters.to_vec();
        storage.snapshot.mut_metadata().set_conf_state(storage.conf_state.clone());
        storage
    }

    /// Takes `write` into the mirror.
    ///
    /// # Errors
    /// A write that cannot follow what is held (a gap in the entries, a
    /// snapshot older than the compacted prefix): the member's log is not
    /// what this replica wrote, and the replica must not start from it.
    pub fn apply(&mut self, write: &ReplicaWrite) -> Result<(), String> {
        match write {
            ReplicaWrite::Entries(entries) => self.append(entries),
            ReplicaWrite::HardState(hard_state) => {
                self.hard_state = hard_state.clone();
                Ok(())
            }
            ReplicaWrite::Snapshot(snapshot) => self.install(snapshot.clone()),
            ReplicaWrite::Compact { index } => {
                self.compact(*index);
                Ok(())
            }
        }
    }

    fn snapshot_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }

    fn first(&self) -> u64 {
        self.snapshot_index() + 1
    }

    fn last(&self) -> u64 {
        self.entries.last().map_or(self.snapshot_index(), Entry::get_index)
    }

    fn append(&mut self, entries: &[Entry]) -> Result<(), String> {
        let Some(first) = entries.first() else { return Ok(()) };
        if first.index < self.first() {
            // Entries before the snapshot are already in it; keep the rest.
            let kept: Vec<Entry> = entries.iter().filter(|entry| entry.index >= self.first()).cloned().collect();
            return self.append(&kept);
        }
        if first.index > self.last() + 1 {
            return Err(format!("entries from {} leave a gap after {}", first.index, self.last()));
        }
        let keep = usize::try_from(first.index - self.first()).expect("an in-memory log");
        self.entry_bytes -= data_bytes(&self.entries[keep.min(self.entries.len())..]);
        self.entries.truncate(keep);
        self.entries.extend_from_slice(entries);
        self.entry_bytes += data_bytes(entries);
        Ok(())
    }

    fn install(&mut self, mut snapshot: Snapshot) -> Result<(), String> {
        let metadata: SnapshotMetadata = snapshot.take_metadata();
        if metadata.index < self.snapshot_index() {
            return Err(format!(
                "snapshot at {} is older than the one held at {}",
                metadata.index,
                self.snapshot_index()
            ));
        }
        let index = metadata.index;
        // Entries the snapshot does not cover, with the same term at its
        // index, stay (a follower's log that matches); anything else goes.
        let matches = self.term_of(index) == Some(metadata.term);
        self.entries.retain(|entry| entry.index > index);
        if !matches {
            self.entries.clear();
        }
        self.entry_bytes = data_bytes(&self.entries);
        self.conf_state = metadata.get_conf_state().clone();
        self.hard_state.commit = self.hard_state.commit.max(index);
        self.hard_state.term = self.hard_state.term.max(metadata.term);
        snapshot.set_metadata(metadata);
        self.snapshot = snapshot;
        Ok(())
    }

    /// Drops entries before `index`, keeping the snapshot that covers them
    /// (a snapshot must have been installed or taken at `index - 1` or later).
    fn compact(&mut self, index: u64) {
        let keep_from = index.min(self.snapshot_index() + 1);
        self.entries.retain(|entry| entry.index >= keep_from);
        self.entry_bytes = data_bytes(&self.entries);
    }

    fn term_of(&self, index: u64) -> Option<u64> {
        if index == self.snapshot_index() {
            return Some(self.snapshot.get_metadata().term);
        }
        let offset = index.checked_sub(self.first())?;
        self.entries.get(usize::try_from(offset).ok()?).map(Entry::get_term)
    }

    /// A membership change was applied: snapshots taken from now on carry
    /// the new configuration. Not written to the log: a restart starts from
    /// the snapshot's configuration and applies the changes after it again,
    /// in order, as raft-rs delivers the committed entries again.
    pub fn set_conf_state(&mut self, conf_state: ConfState) {
        self.conf_state = conf_state;
    }

    /// The configuration a snapshot taken now would carry.
    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    /// The hard state last written.
    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// The last snapshot held (its metadata's index is 0 before any).
    pub fn held_snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// Entries held, after the snapshot.
    pub fn entries_held(&self) -> &[Entry] {
        &self.entries
    }

    /// Bytes of data in [`Self::entries_held`].
    pub fn entry_bytes_held(&self) -> u64 {
        self.entry_bytes
    }

    /// Records a snapshot of the state machine taken at `index` (applied
    /// here, so `index` is committed and held).
    pub fn snapshot_taken(&self, index: u64, data: Vec<u8>) -> Option<Snapshot> {
        let term = self.term_of(index)?;
        let mut snapshot = Snapshot { data: data.into(), ..Snapshot::default() };
        let metadata = snapshot.mut_metadata();
        metadata.index = index;
        metadata.term = term;
        metadata.set_conf_state(self.conf_state.clone());
        Some(snapshot)
    }
}

impl raft::Storage for GroupStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(self.hard_state.clone(), self.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        assert!(high <= self.last() + 1, "raft asked for entries up to {high}, past {}", self.last());
        let from = usize::try_from(low - self.first()).expect("an in-memory log");
        let to = usize::try_from(high - self.first()).expect("an in-memory log");
        // Cloned only as far as `max_size` allows (at least one entry, as
        // raft-rs wants): a follower far behind asks for the whole log
        // past its match, and cloning all of it to keep the first
        // megabyte cost the leader most of its CPU under load.
        let budget = max_size.into().unwrap_or(u64::MAX);
        let mut entries = Vec::new();
        let mut size = 0u64;
        for entry in &self.entries[from..to] {
            size += u64::from(protobuf::Message::compute_size(entry));
            if !entries.is_empty() && size > budget {
                break;
            }
            entries.push(entry.clone());
        }
        Ok(entries)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        if index < self.snapshot_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        self.term_of(index).ok_or(raft::Error::Store(StorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.snapshot_index() < request_index || self.snapshot_index() == 0 {
            // The driver takes snapshots as it compacts; until one covers
            // the index asked for, raft-rs asks again later.
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        Ok(self.snapshot.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    fn entry(index: u64, term: u64) -> Entry {
        Entry { index, term, ..Entry::default() }
    }

    #[test]
    fn a_later_append_replaces_the_suffix_it_overlaps() {
        let mut storage = GroupStorage::initial(&[1, 2, 3]);
        storage.apply(&ReplicaWrite::Entries(vec![entry(1, 1), entry(2, 1), entry(3, 1)])).expect("fits");
        storage.apply(&ReplicaWrite::Entries(vec![entry(2, 2)])).expect("fits");
        assert_eq!(storage.last_index().expect("held"), 2);
        assert_eq!(storage.term(2).expect("held"), 2);
        assert!(storage.apply(&ReplicaWrite::Entries(vec![entry(5, 2)])).is_err(), "a gap is refused");
    }

    #[test]
    fn a_snapshot_keeps_a_matching_suffix_and_drops_a_diverging_one() {
        let mut storage = GroupStorage::initial(&[1, 2, 3]);
        storage.apply(&ReplicaWrite::Entries((1..=5).map(|index| entry(index, 1)).collect())).expect("fits");
        let snapshot = storage.snapshot_taken(3, b"state".to_vec()).expect("held");
        storage.apply(&ReplicaWrite::Snapshot(snapshot)).expect("newer");
        assert_eq!((storage.first_index().expect("held"), storage.last_index().expect("held")), (4, 5));
        assert!(matches!(storage.term(2), Err(raft::Error::Store(StorageError::Compacted))));

        let mut other = Snapshot::default();
        other.mut_metadata().index = 4;
        other.mut_metadata().term = 2;
        storage.apply(&ReplicaWrite::Snapshot(other)).expect("newer");
        assert_eq!(storage.last_index().expect("held"), 4, "entry 5 of term 1 diverged from the snapshot");
        assert!(storage.entries_held().is_empty());
    }

    fn entry_of(index: u64, bytes: usize) -> Entry {
        Entry { index, term: 1, data: vec![7u8; bytes].into(), ..Entry::default() }
    }

    #[test]
    fn the_bytes_held_follow_appends_overwrites_snapshots_and_compactions() {
        let mut storage = GroupStorage::initial(&[1, 2, 3]);
        storage.apply(&ReplicaWrite::Entries((1..=4).map(|index| entry_of(index, 10)).collect())).expect("fits");
        assert_eq!(storage.entry_bytes_held(), 40);
        // 3 and 4 replaced by a longer 3.
        storage.apply(&ReplicaWrite::Entries(vec![entry_of(3, 25)])).expect("fits");
        assert_eq!(storage.entry_bytes_held(), 45);
        let snapshot = storage.snapshot_taken(2, b"state".to_vec()).expect("held");
        storage.apply(&ReplicaWrite::Snapshot(snapshot)).expect("newer");
        assert_eq!(storage.entry_bytes_held(), 25, "only entry 3 is after the snapshot");
        storage.apply(&ReplicaWrite::Compact { index: 3 }).expect("compacts");
        assert_eq!(storage.entry_bytes_held(), data_bytes(storage.entries_held()));
    }

    #[test]
    fn entries_are_cloned_only_up_to_the_size_asked_for_but_always_one() {
        let mut storage = GroupStorage::initial(&[1, 2, 3]);
        storage.apply(&ReplicaWrite::Entries((1..=100).map(|index| entry_of(index, 100)).collect())).expect("fits");
        let context = GetEntriesContext::empty(false);
        let few = storage.entries(1, 101, 350, context).expect("held");
        let size_of_one = u64::from(protobuf::Message::compute_size(&few[0]));
        assert_eq!(few.len() as u64, 350 / size_of_one);
        let one = storage.entries(1, 101, 1, GetEntriesContext::empty(false)).expect("held");
        assert_eq!(one.len(), 1, "raft-rs needs progress even past the limit");
        let all = storage.entries(1, 101, None, GetEntriesContext::empty(false)).expect("held");
        assert_eq!(all.len(), 100);
    }
}
