//! Linearizability checker for the key-value histories the simulator records.
//!
//! The history is split by key, since each key is an independent register and a history is
//! linearizable iff every key's sub-history is (linearizability is local, Herlihy and Wing
//! 1990). Each key is then checked by the Wing-Gong depth-first search over linearization
//! orders with Lowe's memoization, as Porcupine does it: the calls and returns of the key's ops
//! form one list sorted by time, an op may be linearized when its call lies before the first
//! return still in the list, a linearized op is lifted out of the list (and put back on
//! backtrack), and every (set of linearized ops, register value) already explored is cached so
//! that it is never explored twice.
//!
//! How to drive it: collect every finished or abandoned client operation as an [`Operation`] and
//! call [`check_history`]. Only [`Verdict::Linearizable`] is a pass. [`Verdict::Inconclusive`]
//! means the search hit `steps_max_per_key` first; report it as a failure, with the seed.
//!
//! Semantics:
//! - Every key starts absent: the simulator starts on an empty store.
//! - An op with a known outcome takes effect at one point between its call and its return, and
//!   its outcome is what the register gives at that point.
//! - An op with [`KvOutcome::Unknown`] takes effect at one point after its call, or never. Its
//!   `return_us` is ignored (an abandoned request may still be applied later). A `Get` with
//!   unknown outcome constrains nothing and is dropped.
//! - Op A precedes op B in real time iff `A.return_us < B.call_us`; equal times overlap.
//!
//! Unknown outcomes are what make a failing search explode: every pending unknown op may be
//! linearized at any point, so a plain search explores every subset of them, at every dead
//! end. Five rules keep it polynomial in practice; each is argued, where it is coded, not to
//! lose a valid linearization:
//! 1. before searching, an unknown write whose value nothing can observe is dropped, and an
//!    unknown write that is the only writer of a value some completed op observed is made to
//!    complete before that observer returns (`reduce`);
//! 2. an unknown op is not linearized where it would leave the value unchanged;
//! 3. the op linearized right after an unknown op must depend on it (fail, or do nothing,
//!    without it);
//! 4. unknown ops with the same action (typically deletes, and puts of values no op reads)
//!    are linearized in call order;
//! 5. the cache prunes a state when an explored state had the same known ops linearized, the
//!    same value and a subset of its unknown ops (`FinishedStates`); known ops are tried
//!    before unknown ones, so that the smaller state usually comes first.
//!
//! Two more keep the search short under heavy concurrency, unknown outcomes or not: ops are
//! tried earliest return first (see `Level`), and (rule 6) a read that fits the current
//! value is linearized next with no alternative tried, since any valid order can be rewritten
//! to put it there. Values that no op reads are merged into one (`ValueTable`).
//!
//! Misuse by the caller (an outcome of the wrong kind for its op, a known outcome without a
//! return time, a return before the call, a duplicate op id) is a bug in the simulator, not a
//! property of the system under test, so it panics.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::hash::BuildHasherDefault;

/// A hash map with a fixed hasher. Nothing iterates it, so results cannot depend on its order
/// either way; the fixed hasher keeps even memory use the same from run to run.
type FixedHashMap<K, V> = HashMap<K, V, BuildHasherDefault<DefaultHasher>>;

/// A register value; `None` means the key is absent.
pub type Value = Option<Vec<u8>>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvOp {
    Put {
        value: Vec<u8>,
    },
    Get,
    Delete,
    /// Compare-and-swap: if the current value equals `expected` (None = absent), set `new`.
    Cas {
        expected: Value,
        new: Vec<u8>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvOutcome {
    /// The op completed; for Get the value read, for Cas whether it swapped, for Put/Delete nothing.
    Put,
    Get(Value),
    Delete,
    Cas(bool),
    /// The outcome is unknown (timeout, crash): it may or may not have taken effect, at any
    /// point after its call. Only Put/Delete/Cas can be Unknown in practice; a Get with unknown
    /// outcome can simply be dropped by the caller.
    Unknown,
}

#[derive(Debug, Clone)]
pub struct Operation {
    /// Unique in the history, for reporting.
    pub id: u64,
    pub client: u64,
    pub key: Vec<u8>,
    pub op: KvOp,
    /// Simulated time of invocation.
    pub call_us: u64,
    /// None when the outcome is Unknown (treated as returning at infinity).
    pub return_us: Option<u64>,
    pub outcome: KvOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// Some key has no valid linearization; `detail` names the key and lists the ops of the
    /// shortest failing prefix found.
    NotLinearizable {
        key: Vec<u8>,
        detail: String,
    },
    /// The search of `key` hit its step limit before deciding. Not a pass.
    Inconclusive {
        key: Vec<u8>,
        detail: String,
    },
}

/// A step limit for [`check_history`]. Histories of a few hundred ops per key with a dozen
/// concurrent clients and 10% unknown outcomes take a few thousand steps per key, failing or
/// not; a million steps take about a second in a debug build.
pub const STEPS_MAX_PER_KEY_DEFAULT: u64 = 1_000_000;

/// How many ops a failure detail lists at most.
const DETAIL_OPS_MAX: usize = 30;

/// Checks that `ops` is linearizable, key by key, in key order. A definite violation on any key
/// wins over an inconclusive key, so that a real bug is never reported as a mere timeout.
///
/// Each search of a key stops after `steps_max_per_key` steps (one step tries one op at one
/// point). Once a key is found to fail, a few more searches of it, each under the same limit,
/// look for its shortest failing prefix: typically two, at most about log2 of its op count.
pub fn check_history(ops: &[Operation], steps_max_per_key: u64) -> Verdict {
    let mut ids = BTreeSet::new();
    for operation in ops {
        validate(operation);
        assert!(ids.insert(operation.id), "history: op id {} is not unique", operation.id);
    }
    let mut indexes_by_key: BTreeMap<&[u8], Vec<usize>> = BTreeMap::new();
    for (index, operation) in ops.iter().enumerate() {
        if operation.op == KvOp::Get && operation.outcome == KvOutcome::Unknown {
            continue;
        }
        indexes_by_key.entry(&operation.key).or_default().push(index);
    }
    let mut inconclusive = None;
    for (key, indexes) in indexes_by_key {
        match check_key(ops, &indexes, steps_max_per_key) {
            KeyVerdict::Linearizable => {}
            KeyVerdict::NotLinearizable(detail) => {
                return Verdict::NotLinearizable { key: key.to_vec(), detail };
            }
            KeyVerdict::Inconclusive(detail) => {
                inconclusive.get_or_insert(Verdict::Inconclusive { key: key.to_vec(), detail });
            }
        }
    }
    inconclusive.unwrap_or(Verdict::Linearizable)
}

fn validate(operation: &Operation) {
    let answers_op = matches!(
        (&operation.op, &operation.outcome),
        (_, KvOutcome::Unknown)
            | (KvOp::Put { .. }, KvOutcome::Put)
            | (KvOp::Get, KvOutcome::Get(_))
            | (KvOp::Delete, KvOutcome::Delete)
            | (KvOp::Cas { .. }, KvOutcome::Cas(_))
    );
    assert!(
        answers_op,
        "history: op {} has outcome {:?}, which does not answer {:?}",
        operation.id, operation.outcome, operation.op
    );
    if operation.outcome != KvOutcome::Unknown {
        let return_us = operation
            .return_us
            .unwrap_or_else(|| panic!("history: op {} has a known outcome but no return time", operation.id));
        assert!(
            return_us >= operation.call_us,
            "history: op {} returns at {}us, before its call at {}us",
            operation.id,
            return_us,
            operation.call_us
        );
    }
}

enum KeyVerdict {
    Linearizable,
    NotLinearizable(String),
    Inconclusive(String),
}

fn check_key(ops: &[Operation], indexes: &[usize], steps_max: u64) -> KeyVerdict {
    let mut values = ValueTable::new(indexes.iter().map(|&index| &ops[index]));
    let mut key_ops: Vec<KeyOp> =
        indexes.iter().map(|&index| KeyOp::from_operation(index, &ops[index], &mut values)).collect();
    key_ops.sort_by_key(|op| (op.call_us, op.source));
    match search(&reduce(&key_ops), steps_max) {
        SearchOutcome::Linearizable => KeyVerdict::Linearizable,
        SearchOutcome::Inconclusive => {
            let unknown_count = key_ops.iter().filter(|op| op.return_us.is_none()).count();
            KeyVerdict::Inconclusive(format!(
                "key {}: the linearizability search gave up after {} steps over {} ops \
                 ({} with unknown outcome); this is not a pass: raise steps_max_per_key or \
                 shorten the run",
                show_bytes(&ops[indexes[0]].key),
                steps_max,
                key_ops.len(),
                unknown_count
            ))
        }
        SearchOutcome::NotLinearizable(partial) => {
            let failure = shortest_failing_prefix(&key_ops, steps_max, partial);
            KeyVerdict::NotLinearizable(describe_failure(ops, key_ops.len(), &failure, &values))
        }
    }
}

/// Register values of one key, numbered so that the search state is a small integer.
///
/// Values that no op observes (no get returns them, no CAS expects them) all share the number
/// [`UNREAD`]: nothing can tell them apart, so a linearization valid with their true values is
/// valid with one shared value and the other way round. This merges search states that differ
/// only in such a value, and makes unknown writes of such values twins for rule 4, which is
/// what keeps many abandoned puts of never-read values cheap.
struct ValueTable {
    observed: BTreeSet<Vec<u8>>,
    numbers: BTreeMap<Vec<u8>, u32>,
    /// The value of each number from `FIRST_READ` on.
    values: Vec<Vec<u8>>,
}

const ABSENT: u32 = 0;
const UNREAD: u32 = 1;
const FIRST_READ: u32 = 2;

impl ValueTable {
    fn new<'a>(ops: impl Iterator<Item = &'a Operation>) -> ValueTable {
        let mut observed = BTreeSet::new();
        for operation in ops {
            let seen = match (&operation.op, &operation.outcome) {
                (_, KvOutcome::Get(value)) => value,
                (KvOp::Cas { expected, .. }, _) => expected,
                _ => &None,
            };
            if let Some(bytes) = seen {
                observed.insert(bytes.clone());
            }
        }
        ValueTable { observed, numbers: BTreeMap::new(), values: Vec::new() }
    }

    fn number(&mut self, value: Option<&[u8]>) -> u32 {
        let Some(bytes) = value else { return ABSENT };
        if !self.observed.contains(bytes) {
            return UNREAD;
        }
        if let Some(&number) = self.numbers.get(bytes) {
            return number;
        }
        let number = u32::try_from(self.values.len())
            .ok()
            .and_then(|count| count.checked_add(FIRST_READ))
            .expect("fewer than 2^32 values per key");
        self.values.push(bytes.to_vec());
        self.numbers.insert(bytes.to_vec(), number);
        number
    }

    fn show(&self, number: u32) -> String {
        match number {
            ABSENT => "absent".to_string(),
            UNREAD => "one that no op reads".to_string(),
            _ => show_bytes(&self.values[(number - FIRST_READ) as usize]),
        }
    }
}

/// What an op does to the register, with values numbered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Action {
    /// Put (or Delete, writing ABSENT): sets the value whatever it was.
    Write { value: u32 },
    /// Get that returned `value`.
    Read { value: u32 },
    /// `swapped` is None when the outcome is unknown: then the op swaps iff the value is
    /// `expected` at its linearization point.
    Cas { expected: u32, new: u32, swapped: Option<bool> },
}

/// One op of one key, as the search sees it. `return_us` None marks an unknown outcome: the
/// op may be linearized anywhere after its call, or never.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct KeyOp {
    /// Index of the op in the caller's history.
    source: usize,
    call_us: u64,
    return_us: Option<u64>,
    action: Action,
}

impl KeyOp {
    fn from_operation(source: usize, operation: &Operation, values: &mut ValueTable) -> KeyOp {
        let action = match (&operation.op, &operation.outcome) {
            (KvOp::Put { value }, _) => Action::Write { value: values.number(Some(value)) },
            (KvOp::Delete, _) => Action::Write { value: ABSENT },
            (KvOp::Get, KvOutcome::Get(value)) => Action::Read { value: values.number(value.as_deref()) },
            (KvOp::Cas { expected, new }, outcome) => Action::Cas {
                expected: values.number(expected.as_deref()),
                new: values.number(Some(new)),
                swapped: match outcome {
                    KvOutcome::Cas(swapped) => Some(*swapped),
                    _ => None,
                },
            },
            (KvOp::Get, _) => unreachable!("gets with unknown outcome are dropped before"),
        };
        let return_us = match operation.outcome {
            KvOutcome::Unknown => None,
            _ => operation.return_us,
        };
        KeyOp { source, call_us: operation.call_us, return_us, action }
    }

    /// The same op with its outcome forgotten, as when the history is cut while it runs.
    /// A read with unknown outcome constrains nothing, so it becomes None.
    fn forget_outcome(self) -> Option<KeyOp> {
        let action = match self.action {
            Action::Read { .. } => return None,
            Action::Write { value } => Action::Write { value },
            Action::Cas { expected, new, .. } => Action::Cas { expected, new, swapped: None },
        };
        Some(KeyOp { return_us: None, action, ..self })
    }

    /// The value this op writes when it takes effect, if it writes.
    fn written(&self) -> Option<u32> {
        match self.action {
            Action::Write { value } => Some(value),
            Action::Cas { new, swapped: None | Some(true), .. } => Some(new),
            Action::Read { .. } | Action::Cas { swapped: Some(false), .. } => None,
        }
    }
}

/// The register model: the value after `action` at a point where the value is `value`, or
/// None when the op's recorded outcome is impossible there.
fn apply(value: u32, action: Action) -> Option<u32> {
    match action {
        Action::Write { value: written } => Some(written),
        Action::Read { value: read } => (read == value).then_some(value),
        Action::Cas { expected, new, swapped: Some(true) } => (value == expected).then_some(new),
        Action::Cas { expected, swapped: Some(false), .. } => (value != expected).then_some(value),
        Action::Cas { expected, new, swapped: None } => Some(if value == expected { new } else { value }),
    }
}

/// Rule 3: whether `op`, linearized right after an unknown op U that changed the value from
/// `before`, depends on U: an op with a known outcome must not fit `before`; an unknown op must
/// be a CAS that would do nothing at `before`.
///
/// Any valid linearization can be rewritten so that this holds. Say U wrote x (not `before`,
/// by rule 2) and `op` follows without depending on it. If `op` is a read or a refused CAS
/// that fits `before`, it fits there too: swap it before U. If it is a put or a delete, known
/// or not, it hides U: drop U. A swapping CAS cannot fit both values. An unknown CAS that would
/// act at `before` expects `before`, so it does nothing at x: drop it. Each rewrite moves U
/// later or removes an op, so rewriting ends.
fn depends_on_unknown(op: &KeyOp, before: u32) -> bool {
    match (op.return_us, op.action) {
        (Some(_), action) => apply(before, action).is_none(),
        (None, action @ Action::Cas { .. }) => apply(before, action) == Some(before),
        (None, Action::Write { .. } | Action::Read { .. }) => false,
    }
}

/// Rule 1: rewrites the unknown writes of one key (sorted by call) into an equivalent
/// sub-history that is cheaper to search; the result is linearizable iff the input is.
///
/// Dropping: let unknown op U write x, where no op reads x, no CAS that swapped (or may have)
/// expects x, and no refused CAS returns at or after U's call. Take a valid linearization that uses U. Until the next
/// op that changes the value, the value is x, and the only ops that accept x there are puts
/// and deletes (which end that stretch) and unknown CASes that leave x alone (a refused CAS
/// would have to return after U's call). Remove U and those no-op unknown CASes: every other
/// op sees the same value as before, so the result is valid without U.
///
/// Forcing: let unknown op U be the only op that writes x (x is not absent, which the initial
/// value writes), and let some op with a return time observe x (read it, or swap from it).
/// In any valid linearization that observer follows a write of x, which must be U, so U took
/// effect before the observer returned. Giving U that return time (and, for a CAS, the
/// outcome "swapped") loses no linearization, and bounds how long U stays a candidate. A
/// forced CAS observes its expected value in turn, so forcing repeats until nothing changes.
fn reduce(ops: &[KeyOp]) -> Vec<KeyOp> {
    let observations = Observations::of(ops);
    let mut reduced: Vec<KeyOp> = ops.iter().copied().filter(|op| !observations.may_drop(op)).collect();
    // Each round forces at least one more op, so this ends.
    loop {
        let observations = Observations::of(&reduced);
        let mut forced_any = false;
        for op in &mut reduced {
            if let Some(forced) = observations.force(op) {
                *op = forced;
                forced_any = true;
            }
        }
        if !forced_any {
            return reduced;
        }
    }
}

/// Who writes and who observes each value of one key, for [`reduce`].
struct Observations {
    /// How many ops may write each value; the initial absent value counts as one writer.
    writer_count: BTreeMap<u32, u32>,
    /// Values read, or expected by a CAS that swapped or may have swapped.
    observed: BTreeSet<u32>,
    /// For each observed value, the earliest return of an op with a return time observing it.
    observer_return_min_us: BTreeMap<u32, u64>,
    refused_return_max_us: Option<u64>,
}

impl Observations {
    fn of(ops: &[KeyOp]) -> Observations {
        let mut observations = Observations {
            writer_count: BTreeMap::from([(ABSENT, 1)]),
            observed: BTreeSet::new(),
            observer_return_min_us: BTreeMap::new(),
            refused_return_max_us: None,
        };
        for op in ops {
            if let Some(value) = op.written() {
                *observations.writer_count.entry(value).or_default() += 1;
            }
            let observation = match op.action {
                Action::Read { value } => Some(value),
                Action::Cas { expected, swapped: None | Some(true), .. } => Some(expected),
                Action::Write { .. } => None,
                Action::Cas { swapped: Some(false), .. } => {
                    observations.refused_return_max_us = observations.refused_return_max_us.max(op.return_us);
                    None
                }
            };
            if let Some(value) = observation {
                observations.observed.insert(value);
                if let Some(return_us) = op.return_us {
                    let first = observations.observer_return_min_us.entry(value).or_insert(return_us);
                    *first = (*first).min(return_us);
                }
            }
        }
        observations
    }

    fn may_drop(&self, op: &KeyOp) -> bool {
        let Some(value) = op.written().filter(|_| op.return_us.is_none()) else {
            return false;
        };
        let refused_after_call = self.refused_return_max_us.is_some_and(|max| max >= op.call_us);
        !self.observed.contains(&value) && !refused_after_call
    }

    /// `op` with the return time it must respect, if it is an unknown op that must take effect.
    fn force(&self, op: &KeyOp) -> Option<KeyOp> {
        let value = op.written().filter(|_| op.return_us.is_none())?;
        if self.writer_count[&value] != 1 {
            return None;
        }
        let observer_return_us = *self.observer_return_min_us.get(&value)?;
        let action = match op.action {
            Action::Cas { expected, new, .. } => Action::Cas { expected, new, swapped: Some(true) },
            action => action,
        };
        // Clamped to the call: if the observer returned before U was even called, the search
        // finds that no write of x can precede it.
        let return_us = Some(observer_return_us.max(op.call_us));
        Some(KeyOp { return_us, action, ..*op })
    }
}

enum SearchOutcome {
    Linearizable,
    NotLinearizable(PartialLinearization),
    Inconclusive,
}

/// The longest sequence of ops the search managed to linearize, for the failure report.
#[derive(Clone, Debug)]
struct PartialLinearization {
    /// History indexes (`KeyOp::source`), in linearization order.
    sources: Vec<usize>,
    /// The register value after them.
    value: u32,
}

/// One level of the depth-first search: the state reached after `depth` ops, the ops that may
/// go next there, in the order they are tried, and how many have been tried.
///
/// Ops with a known outcome are tried first, earliest return first: the op that must be
/// linearized soonest is the likeliest to be right, and an op with a long interval (such as a
/// forced unknown op, see [`reduce`]) is tried late instead of first at every level. Then the
/// unknown ops called before the first pending return. Trying known ops first means that a
/// state is usually explored without an unknown op before it is reached with it, which is
/// what lets the cache prune the second (rule 5). Rules 3, 4 and 6 trim the list.
#[derive(Default)]
struct Level {
    candidates: Vec<usize>,
    /// Scratch for [`Search::fill_candidates`]: values the ops that may go next read or swap
    /// from.
    demanded: Vec<u32>,
    tried: usize,
    /// The op whose linearization led here, None at the root.
    placed: Option<Placed>,
}

/// An op linearized, and the state before it, to undo it on backtrack.
struct Placed {
    op: usize,
    value_before: u32,
    guard_before: Option<u32>,
}

/// States whose exploration is over, without success (rule 5): a cache keyed by (known ops
/// linearized, value, rule 3's guard), holding for each the sets of unknown ops that had been
/// linearized.
///
/// A state is pruned if a finished state has the same known ops and value, a subset of its
/// unknown ops, and the same guard or none: any continuation of the pruned state also
/// continues the finished one (an unknown op may stay unlinearized for good, and has no return
/// time to respect; a twin placed out of rule 4's order can be swapped for the earlier one), so
/// it would fail too. Why pruning loses nothing: call a success path from a state canonical if
/// it respects rules 2 to 4 and 6 and the state's guard; from a state without a guard, any
/// success path can be rewritten into a canonical one (by the rewrites argued at each rule,
/// which end). If the search failed although a canonical success was possible somewhere, take
/// the state X that finished first among those, and such a path. Its first op was tried from
/// X and led to a state that either finished before X, or was pruned by a state that finished
/// before X, from which a canonical success is also possible (the same path if the guards are
/// equal; a rewritten one if the pruning state has none): either way X was not first. Only
/// finished states prune, never the states on the current path, for this argument to hold.
#[derive(Default)]
struct FinishedStates {
    unknown_sets_by_known: FixedHashMap<Box<[u64]>, Vec<Box<[u64]>>>,
}

impl FinishedStates {
    fn prunes(&self, known: &[u64], unknown: &[u64]) -> bool {
        self.unknown_sets_by_known
            .get(known)
            .is_some_and(|sets| sets.iter().any(|set| is_subset(set, unknown)))
    }

    fn insert(&mut self, known: &[u64], unknown: &[u64]) {
        let sets = self.unknown_sets_by_known.entry(known.into()).or_default();
        // A set that contains this one now prunes nothing more than this one does.
        sets.retain(|set| !is_subset(unknown, set));
        sets.push(unknown.into());
    }
}

fn is_subset(small: &[u64], large: &[u64]) -> bool {
    small.iter().zip(large).all(|(s, l)| s & !l == 0)
}

fn search(ops: &[KeyOp], steps_max: u64) -> SearchOutcome {
    Search::new(ops).run(steps_max)
}

/// The depth-first search over one key's ops.
///
/// The entry list holds the calls and returns of the ops with a known outcome, sorted by time
/// (at equal times calls first: such ops overlap). Node 0 is the head, nodes `1..=n` the calls
/// of ops `0..n`, nodes `n+1..=2n` their returns, node `2n+1` the tail; the nodes of unknown
/// ops are never linked. The ops that may go next are those called before the first return in
/// the list. A lifted node keeps its own links, so it goes back in place when the lifts are
/// undone in reverse order, which the depth-first search guarantees.
struct Search<'a> {
    ops: &'a [KeyOp],
    next: Vec<usize>,
    previous: Vec<usize>,
    /// Rank of each node in the sorted list of all calls and returns, unknown ops included;
    /// `usize::MAX` for the head, the tail and the returns of unknown ops.
    rank: Vec<usize>,
    twins: Twins,
    /// Bitset of linearized known ops, then one word for the value and rule 3's guard.
    known: Vec<u64>,
    /// Bitset of linearized unknown ops, by position.
    unknown: Vec<u64>,
    /// The register value now.
    value: u32,
    /// The value before the last op placed, when that op has an unknown outcome (rule 3).
    guard: Option<u32>,
    /// The path from the root: `levels[..depth]` are in use, the rest keep their buffers.
    levels: Vec<Level>,
    depth: usize,
    known_left: usize,
    finished: FinishedStates,
    deepest: PartialLinearization,
    /// The path went deeper than `deepest` since it was recorded.
    deepest_stale: bool,
}

const HEAD: usize = 0;

impl<'a> Search<'a> {
    fn new(ops: &'a [KeyOp]) -> Search<'a> {
        let (next, previous, rank) = entry_list(ops);
        let twins = Twins::new(ops);
        let unknown_count = twins.group_of.iter().filter(|g| g.is_some()).count();
        Search {
            ops,
            next,
            previous,
            rank,
            twins,
            known: vec![0; ops.len().div_ceil(64) + 1],
            unknown: vec![0; unknown_count.div_ceil(64)],
            value: ABSENT,
            guard: None,
            levels: vec![Level::default()],
            depth: 1,
            known_left: ops.len() - unknown_count,
            finished: FinishedStates::default(),
            deepest: PartialLinearization { sources: Vec::new(), value: ABSENT },
            deepest_stale: false,
        }
    }

    fn run(mut self, steps_max: u64) -> SearchOutcome {
        let mut root = std::mem::take(&mut self.levels[0]);
        self.fill_candidates(&mut root);
        self.levels[0] = root;
        self.set_state();
        // Unknown ops left over when every known op is placed go last, which is the same as
        // never: nothing after them observes them.
        for _ in 0..steps_max {
            if self.known_left == 0 {
                return SearchOutcome::Linearizable;
            }
            let level = &mut self.levels[self.depth - 1];
            match level.candidates.get(level.tried) {
                Some(&index) => {
                    level.tried += 1;
                    self.try_place(index);
                }
                None => {
                    // Every op that may go next has been tried from here.
                    if !self.undo_last() {
                        return SearchOutcome::NotLinearizable(self.deepest);
                    }
                }
            }
        }
        if self.known_left == 0 {
            return SearchOutcome::Linearizable;
        }
        SearchOutcome::Inconclusive
    }

    /// Linearizes op `index` next, and descends, if it fits and no finished state prunes it.
    fn try_place(&mut self, index: usize) {
        let Some(after) = self.step(index, self.value, self.guard) else {
            return;
        };
        let is_known = self.ops[index].return_us.is_some();
        let guard_after = (!is_known).then_some(self.value);
        self.set_linearized(index, true);
        if self.is_pruned(after, guard_after) {
            self.set_linearized(index, false);
            self.set_state();
            return;
        }
        if is_known {
            self.known_left -= 1;
            self.lift(index);
        }
        let placed = Placed { op: index, value_before: self.value, guard_before: self.guard };
        (self.value, self.guard) = (after, guard_after);
        self.set_state();
        if self.levels.len() == self.depth {
            self.levels.push(Level::default());
        }
        let mut level = std::mem::take(&mut self.levels[self.depth]);
        level.tried = 0;
        level.placed = Some(placed);
        self.fill_candidates(&mut level);
        self.levels[self.depth] = level;
        self.depth += 1;
        self.deepest_stale |= self.depth - 1 > self.deepest.sources.len();
    }

    /// Marks the current state finished and undoes the last op placed; false at the root.
    fn undo_last(&mut self) -> bool {
        if self.deepest_stale {
            // The first undo after a new maximum depth is made at that depth.
            self.deepest.sources = self.levels[1..self.depth]
                .iter()
                .filter_map(|level| level.placed.as_ref())
                .map(|placed| self.ops[placed.op].source)
                .collect();
            self.deepest.value = self.value;
            self.deepest_stale = false;
        }
        let Some(placed) = self.levels[self.depth - 1].placed.take() else {
            return false;
        };
        self.finished.insert(&self.known, &self.unknown);
        self.depth -= 1;
        self.set_linearized(placed.op, false);
        if self.ops[placed.op].return_us.is_some() {
            self.known_left += 1;
            self.unlift(placed.op);
        }
        (self.value, self.guard) = (placed.value_before, placed.guard_before);
        self.set_state();
        true
    }

    /// Fills `level.candidates` with the ops that may be linearized next from the current
    /// state, in the order to try them (see [`Level`]).
    fn fill_candidates(&self, level: &mut Level) {
        let (first_return, refused_now) = self.fill_known_candidates(level);
        if let Some(index) = self.fitting_read(&level.candidates) {
            level.candidates.clear();
            level.candidates.push(index);
            return;
        }
        self.add_unknown_candidates(level, first_return, refused_now);
    }

    /// Lists the known ops that may go next, earliest return first, and the values they read
    /// or swap from in `level.demanded`. After an unknown op, only those that depend on it
    /// (rule 3). Returns the first return node of the list, and whether a refused CAS among
    /// them expects the current value.
    fn fill_known_candidates(&self, level: &mut Level) -> (usize, bool) {
        level.candidates.clear();
        level.demanded.clear();
        let op_count = self.ops.len();
        let mut refused_now = false;
        let mut node = self.next[HEAD];
        while (1..=op_count).contains(&node) {
            let op = &self.ops[node - 1];
            match op.action {
                Action::Read { value } => level.demanded.push(value),
                Action::Cas { expected, swapped: Some(true), .. } => {
                    level.demanded.push(expected);
                }
                Action::Cas { expected, swapped: Some(false), .. } => {
                    refused_now |= expected == self.value;
                }
                Action::Write { .. } | Action::Cas { swapped: None, .. } => {}
            }
            if self.guard.is_none_or(|before| depends_on_unknown(op, before)) {
                level.candidates.push(node - 1);
            }
            node = self.next[node];
        }
        level.candidates.sort_unstable_by_key(|&index| self.rank[1 + op_count + index]);
        (node, refused_now)
    }

    /// Rule 6: a read (or refused CAS) that fits now can go first in any valid continuation:
    /// it changes nothing, and every op that must precede it in real time is placed already.
    /// Not after an unknown op, where rule 3 decides what goes next.
    fn fitting_read(&self, candidates: &[usize]) -> Option<usize> {
        if self.guard.is_some() {
            return None;
        }
        candidates.iter().copied().find(|&index| {
            let action = self.ops[index].action;
            let read_only = matches!(action, Action::Read { .. } | Action::Cas { swapped: Some(false), .. });
            read_only && apply(self.value, action).is_some()
        })
    }

    /// Adds the unknown ops that may go next: the first op not placed of each group of twins
    /// (rule 4), if it was called before `first_return`. Only groups that can change the value
    /// are looked at: all the writes, and the CASes expecting the value.
    ///
    /// Rule 3 filters them here already: an unknown op U is listed only if some op could
    /// depend on it next. The ops that may go after U are the ones that may go now (U is not
    /// in the entry list), so the value U writes must be read, or swapped from, by one of them
    /// (CASes with unknown outcome included), or U must move the value away from what a
    /// refused CAS among them expects.
    fn add_unknown_candidates(&self, level: &mut Level, first_return: usize, refused_now: bool) {
        let value = self.value;
        let first_return_rank = self.rank[first_return];
        let pending =
            |group: &usize| self.twins.next(*group).filter(|&index| self.rank[1 + index] < first_return_rank);
        let cas_expecting = |value: u32| self.twins.cas_groups_by_expected.get(&value).into_iter().flatten();
        let able = self.twins.write_groups.iter().chain(cas_expecting(value));
        for index in able.filter_map(pending) {
            let op = &self.ops[index];
            let useful = apply(value, op.action).is_some_and(|after| {
                after != value
                    && (refused_now
                        || level.demanded.contains(&after)
                        || cas_expecting(after).any(|group| pending(group).is_some()))
            });
            let depends = self.guard.is_none_or(|before| depends_on_unknown(op, before));
            if useful && depends {
                level.candidates.push(index);
            }
        }
    }

    /// The value after linearizing op `index` now, or None if it cannot or need not go here.
    fn step(&self, index: usize, value: u32, guard: Option<u32>) -> Option<u32> {
        let op = &self.ops[index];
        let after = if op.return_us.is_some() {
            apply(value, op.action)?
        } else {
            if self.twins.next_of(index) != Some(index) {
                // Rule 4: swapping two unknown ops with the same action turns any valid
                // linearization into one that places them in call order.
                return None;
            }
            let after = apply(value, op.action)?;
            // Rule 2: placing an unknown op that changes nothing is the same as never
            // placing it.
            if after == value {
                return None;
            }
            after
        };
        if guard.is_some_and(|before| !depends_on_unknown(op, before)) {
            return None;
        }
        Some(after)
    }

    /// Whether a finished state prunes the current one with this value and guard. A finished
    /// state without a guard also prunes one with a guard: it was explored with fewer
    /// restrictions.
    fn is_pruned(&mut self, value: u32, guard: Option<u32>) -> bool {
        self.write_state_word(value, None);
        if self.finished.prunes(&self.known, &self.unknown) {
            return true;
        }
        self.write_state_word(value, guard);
        guard.is_some() && self.finished.prunes(&self.known, &self.unknown)
    }

    fn set_linearized(&mut self, index: usize, linearized: bool) {
        let (words, position) = if self.ops[index].return_us.is_some() {
            (&mut self.known, index)
        } else {
            let position = self.twins.place(index, linearized);
            (&mut self.unknown, position)
        };
        let bit = 1 << (position % 64);
        if linearized {
            words[position / 64] |= bit;
        } else {
            words[position / 64] &= !bit;
        }
    }

    /// Writes the value and the guard in the last word of `known`, the cache key.
    fn set_state(&mut self) {
        self.write_state_word(self.value, self.guard);
    }

    fn write_state_word(&mut self, value: u32, guard: Option<u32>) {
        let guard_word = guard.map_or(0, |before| u64::from(before) + 1);
        *self.known.last_mut().expect("known ends with the state word") =
            u64::from(value) | (guard_word << 32);
    }

    fn lift(&mut self, index: usize) {
        self.unlink(1 + index);
        self.unlink(1 + self.ops.len() + index);
    }

    fn unlift(&mut self, index: usize) {
        self.relink(1 + self.ops.len() + index);
        self.relink(1 + index);
    }

    fn unlink(&mut self, node: usize) {
        let (previous, next) = (self.previous[node], self.next[node]);
        self.next[previous] = next;
        self.previous[next] = previous;
    }

    fn relink(&mut self, node: usize) {
        let (previous, next) = (self.previous[node], self.next[node]);
        self.next[previous] = node;
        self.previous[next] = node;
    }
}

/// The entry list of [`Search`]: `next` and `previous` links, and the rank of every node.
fn entry_list(ops: &[KeyOp]) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
    let op_count = ops.len();
    let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * op_count);
    for (index, op) in ops.iter().enumerate() {
        events.push((op.call_us, false, index));
        if let Some(return_us) = op.return_us {
            assert!(return_us >= op.call_us, "op returns before its call");
            events.push((return_us, true, index));
        }
    }
    // At equal times calls sort first (false < true), so that such ops overlap.
    events.sort_unstable();
    let tail = 2 * op_count + 1;
    let mut next = vec![tail; tail + 1];
    let mut previous = vec![HEAD; tail + 1];
    let mut rank = vec![usize::MAX; tail + 1];
    let mut last = HEAD;
    for (event_rank, &(_, is_return, index)) in events.iter().enumerate() {
        let node = if is_return { 1 + op_count + index } else { 1 + index };
        rank[node] = event_rank;
        if ops[index].return_us.is_some() {
            next[last] = node;
            previous[node] = last;
            last = node;
        }
    }
    next[last] = tail;
    previous[tail] = last;
    (next, previous, rank)
}

/// The unknown ops of one key grouped by action, each group in call order: twins, which
/// rule 4 places in that order, so that the ones placed are always a prefix of their group.
struct Twins {
    groups: Vec<Vec<usize>>,
    /// For each op, its group if its outcome is unknown.
    group_of: Vec<Option<usize>>,
    /// For each unknown op, its position among the unknown ops in call order.
    position: Vec<usize>,
    /// For each group, how many of its ops are placed.
    placed: Vec<usize>,
    /// The groups of puts and deletes.
    write_groups: Vec<usize>,
    /// The groups of CASes, by the value they expect.
    cas_groups_by_expected: BTreeMap<u32, Vec<usize>>,
}

impl Twins {
    fn new(ops: &[KeyOp]) -> Twins {
        let mut twins = Twins {
            groups: Vec::new(),
            group_of: vec![None; ops.len()],
            position: vec![usize::MAX; ops.len()],
            placed: Vec::new(),
            write_groups: Vec::new(),
            cas_groups_by_expected: BTreeMap::new(),
        };
        let mut group_by_action: BTreeMap<Action, usize> = BTreeMap::new();
        let unknown = (0..ops.len()).filter(|&index| ops[index].return_us.is_none());
        for (position, index) in unknown.enumerate() {
            let action = ops[index].action;
            let group = *group_by_action.entry(action).or_insert_with(|| {
                let group = twins.groups.len();
                twins.groups.push(Vec::new());
                twins.placed.push(0);
                match action {
                    Action::Cas { expected, .. } => {
                        twins.cas_groups_by_expected.entry(expected).or_default().push(group);
                    }
                    Action::Write { .. } | Action::Read { .. } => twins.write_groups.push(group),
                }
                group
            });
            twins.groups[group].push(index);
            twins.group_of[index] = Some(group);
            twins.position[index] = position;
        }
        twins
    }

    /// The first op of `group` not placed yet.
    fn next(&self, group: usize) -> Option<usize> {
        self.groups[group].get(self.placed[group]).copied()
    }

    /// The first op not placed yet of the group of unknown op `index`.
    fn next_of(&self, index: usize) -> Option<usize> {
        self.next(self.group_of[index].expect("an unknown op"))
    }

    /// Records unknown op `index` as placed or not; returns its position.
    fn place(&mut self, index: usize, placed: bool) -> usize {
        let group = self.group_of[index].expect("an unknown op");
        if placed {
            assert_eq!(self.next(group), Some(index), "twins go in call order");
            self.placed[group] += 1;
        } else {
            self.placed[group] -= 1;
            assert_eq!(self.next(group), Some(index), "twins go back in order");
        }
        self.position[index]
    }
}

/// A failing sub-history of one key, for the report.
struct Failure {
    /// The history was cut at this time (None: the whole history of the key fails).
    cut_us: Option<u64>,
    /// The ops of the failing prefix, by call time, before [`reduce`].
    prefix: Vec<KeyOp>,
    partial: PartialLinearization,
}

/// The ops of `ops` invoked by `cut_us`, with the outcome of those still running then
/// forgotten. If the whole history is linearizable, so is every such prefix (keep the
/// linearization points at or before the cut), and so the prefixes that fail are exactly those
/// cut at or after some time: a binary search finds the earliest.
fn cut_prefix(ops: &[KeyOp], cut_us: u64) -> Vec<KeyOp> {
    ops.iter()
        .filter(|op| op.call_us <= cut_us)
        .filter_map(|&op| match op.return_us {
            Some(return_us) if return_us <= cut_us => Some(op),
            _ => op.forget_outcome(),
        })
        .collect()
}

/// Search over cuts at return times for the shortest prefix shown to fail. A cut whose search
/// hits the step limit counts as passing, so the prefix reported always truly fails.
///
/// Failing searches cost the most (they exhaust every order up to the failure), so the first
/// cut tried is a guess: the return of the earliest-returning op that the longest partial
/// linearization could not place, where the search got stuck. If it fails and the cut just
/// before passes, that is the answer; otherwise a binary search goes on from there.
fn shortest_failing_prefix(ops: &[KeyOp], steps_max: u64, whole: PartialLinearization) -> Failure {
    let mut cuts_us: Vec<u64> = ops.iter().filter_map(|op| op.return_us).collect();
    cuts_us.sort_unstable();
    cuts_us.dedup();
    let guess = stuck_op(ops, &whole)
        .and_then(|op| op.return_us)
        .and_then(|return_us| cuts_us.binary_search(&return_us).ok());
    let mut failure = Failure { cut_us: None, prefix: ops.to_vec(), partial: whole };
    // Cuts at indexes >= `failing_from` fail (the whole history stands for index len).
    let (mut passing_below, mut failing_from) = (0, cuts_us.len());
    let mut hints = guess.into_iter().chain(guess.and_then(|g| g.checked_sub(1)));
    while passing_below < failing_from {
        let middle = hints
            .find(|hint| (passing_below..failing_from).contains(hint))
            .unwrap_or(passing_below + (failing_from - passing_below) / 2);
        let prefix = cut_prefix(ops, cuts_us[middle]);
        match search(&reduce(&prefix), steps_max) {
            SearchOutcome::NotLinearizable(partial) => {
                failing_from = middle;
                failure = Failure { cut_us: Some(cuts_us[middle]), prefix, partial };
            }
            SearchOutcome::Linearizable | SearchOutcome::Inconclusive => {
                passing_below = middle + 1;
            }
        }
    }
    failure
}

/// The op with a return time that the partial linearization left out and that returns first:
/// where the search got stuck.
fn stuck_op<'a>(ops: &'a [KeyOp], partial: &PartialLinearization) -> Option<&'a KeyOp> {
    let placed: BTreeSet<usize> = partial.sources.iter().copied().collect();
    ops.iter()
        .filter(|op| op.return_us.is_some() && !placed.contains(&op.source))
        .min_by_key(|op| (op.return_us, op.call_us, op.source))
}

fn describe_failure(
    ops: &[Operation],
    key_op_count: usize,
    failure: &Failure,
    values: &ValueTable,
) -> String {
    let prefix = &failure.prefix;
    let partial = &failure.partial;
    let key = show_bytes(&ops[prefix[0].source].key);
    let mut detail = format!("key {key}: no valid linearization.\n");
    let _ = match failure.cut_us {
        Some(cut_us) => writeln!(
            detail,
            "Shortest failing prefix found: the {} ops invoked by {cut_us}us (of {key_op_count} \
             on this key); ops still running at {cut_us}us count as unknown outcome.",
            prefix.len()
        ),
        None => writeln!(detail, "The whole history of the key ({key_op_count} ops) fails."),
    };
    let last_placed: Vec<String> = partial.sources[partial.sources.len().saturating_sub(8)..]
        .iter()
        .map(|&source| ops[source].id.to_string())
        .collect();
    let _ = write!(
        detail,
        "Longest partial linearization: {} ops, ending with op ids [{}], leaving the value {}.",
        partial.sources.len(),
        last_placed.join(", "),
        values.show(partial.value)
    );
    if let Some(stuck) = stuck_op(prefix, partial) {
        let id = ops[stuck.source].id;
        let _ = write!(detail, " The earliest-returning op it could not place: op {id}.");
    }
    let _ =
        writeln!(detail, "\nOps of that prefix by call time (id, client, [call, return], op -> outcome):");
    let omitted = prefix.len().saturating_sub(DETAIL_OPS_MAX);
    if omitted > 0 {
        let _ = writeln!(detail, "  ({omitted} earlier ops omitted)");
    }
    for op in &prefix[omitted..] {
        let operation = &ops[op.source];
        let running_at_cut = operation.outcome != KvOutcome::Unknown && op.return_us.is_none();
        let note = if running_at_cut { " (running at the cut)" } else { "" };
        let _ = writeln!(detail, "  {}{note}", show_operation(operation));
    }
    detail
}

fn show_operation(operation: &Operation) -> String {
    let op = match &operation.op {
        KvOp::Put { value } => format!("put {}", show_bytes(value)),
        KvOp::Get => "get".to_string(),
        KvOp::Delete => "delete".to_string(),
        KvOp::Cas { expected, new } => {
            format!("cas {} -> {}", show_value(expected), show_bytes(new))
        }
    };
    let outcome = match &operation.outcome {
        KvOutcome::Put | KvOutcome::Delete => "ok".to_string(),
        KvOutcome::Get(value) => show_value(value),
        KvOutcome::Cas(true) => "swapped".to_string(),
        KvOutcome::Cas(false) => "refused".to_string(),
        KvOutcome::Unknown => "unknown".to_string(),
    };
    let return_at = match (&operation.outcome, operation.return_us) {
        (KvOutcome::Unknown, _) | (_, None) => "?".to_string(),
        (_, Some(return_us)) => format!("{return_us}us"),
    };
    format!(
        "op {} client {} [{}us, {}] {} -> {}",
        operation.id, operation.client, operation.call_us, return_at, op, outcome
    )
}

fn show_value(value: &Value) -> String {
    match value {
        None => "absent".to_string(),
        Some(bytes) => show_bytes(bytes),
    }
}

/// Bytes as a quoted, escaped string, cut after 40 bytes.
fn show_bytes(bytes: &[u8]) -> String {
    const SHOWN_BYTES_MAX: usize = 40;
    if bytes.len() <= SHOWN_BYTES_MAX {
        return format!("\"{}\"", bytes.escape_ascii());
    }
    format!("\"{}\"...({} bytes)", bytes[..SHOWN_BYTES_MAX].escape_ascii(), bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use std::time::Instant;

    const STEPS_MAX: u64 = STEPS_MAX_PER_KEY_DEFAULT;

    fn bytes(text: &str) -> Vec<u8> {
        text.as_bytes().to_vec()
    }

    fn put(value: &str) -> KvOp {
        KvOp::Put { value: bytes(value) }
    }

    fn cas(expected: Option<&str>, new: &str) -> KvOp {
        KvOp::Cas { expected: expected.map(bytes), new: bytes(new) }
    }

    fn got(value: Option<&str>) -> KvOutcome {
        KvOutcome::Get(value.map(bytes))
    }

    /// An op with a known outcome; each op has its own client unless a test says otherwise.
    fn done(id: u64, key: &str, op: KvOp, call_us: u64, return_us: u64, outcome: KvOutcome) -> Operation {
        Operation { id, client: id, key: bytes(key), op, call_us, return_us: Some(return_us), outcome }
    }

    fn unknown(id: u64, key: &str, op: KvOp, call_us: u64) -> Operation {
        Operation {
            id,
            client: id,
            key: bytes(key),
            op,
            call_us,
            return_us: None,
            outcome: KvOutcome::Unknown,
        }
    }

    fn assert_linearizable(ops: &[Operation]) {
        let verdict = check_history(ops, STEPS_MAX);
        assert_eq!(verdict, Verdict::Linearizable, "{verdict:#?}");
    }

    /// Asserts a violation on `key` and returns its detail.
    fn assert_not_linearizable(ops: &[Operation], key: &str) -> String {
        match check_history(ops, STEPS_MAX) {
            Verdict::NotLinearizable { key: bad, detail } => {
                assert_eq!(bad, bytes(key), "{detail}");
                assert!(detail.contains(&format!("key \"{key}\"")), "{detail}");
                detail
            }
            verdict => panic!("expected a violation on {key:?}, got {verdict:#?}"),
        }
    }

    #[test]
    fn empty_history_is_linearizable() {
        assert_linearizable(&[]);
    }

    #[test]
    fn sequential_ops_are_linearizable() {
        assert_linearizable(&[
            done(1, "k", KvOp::Get, 0, 10, got(None)),
            done(2, "k", put("a"), 20, 30, KvOutcome::Put),
            done(3, "k", KvOp::Get, 40, 50, got(Some("a"))),
            done(4, "k", put("b"), 60, 70, KvOutcome::Put),
            done(5, "k", KvOp::Get, 80, 90, got(Some("b"))),
            done(6, "k", cas(Some("b"), "c"), 100, 110, KvOutcome::Cas(true)),
            done(7, "k", cas(Some("b"), "d"), 120, 130, KvOutcome::Cas(false)),
            done(8, "k", KvOp::Get, 140, 150, got(Some("c"))),
        ]);
    }

    #[test]
    fn concurrent_get_may_see_the_old_or_the_new_value() {
        for seen in [Some("a"), Some("b")] {
            assert_linearizable(&[
                done(1, "k", put("a"), 0, 10, KvOutcome::Put),
                done(2, "k", put("b"), 20, 100, KvOutcome::Put),
                done(3, "k", KvOp::Get, 30, 60, got(seen)),
            ]);
        }
        // Reading the new value, then the old one, while the put still runs: the put cannot
        // be both after the first read's point and before it.
        assert_not_linearizable(
            &[
                done(1, "k", put("a"), 0, 10, KvOutcome::Put),
                done(2, "k", put("b"), 20, 100, KvOutcome::Put),
                done(3, "k", KvOp::Get, 30, 40, got(Some("b"))),
                done(4, "k", KvOp::Get, 50, 60, got(Some("a"))),
            ],
            "k",
        );
    }

    #[test]
    fn ops_touching_in_time_overlap() {
        // The get is called at the very time the put returns: they overlap, so either order.
        assert_linearizable(&[
            done(1, "k", put("a"), 0, 10, KvOutcome::Put),
            done(2, "k", KvOp::Get, 10, 20, got(None)),
        ]);
        assert_not_linearizable(
            &[done(1, "k", put("a"), 0, 10, KvOutcome::Put), done(2, "k", KvOp::Get, 11, 20, got(None))],
            "k",
        );
    }

    #[test]
    fn stale_read_after_completed_put_is_not_linearizable() {
        let detail = assert_not_linearizable(
            &[
                done(1, "k", put("a"), 0, 10, KvOutcome::Put),
                done(2, "k", put("b"), 20, 30, KvOutcome::Put),
                done(3, "k", KvOp::Get, 40, 50, got(Some("a"))),
            ],
            "k",
        );
        assert!(detail.contains("op 3 client 3 [40us, 50us] get -> \"a\""), "{detail}");
    }

    #[test]
    fn read_of_a_value_never_written_is_not_linearizable() {
        assert_not_linearizable(
            &[done(1, "k", put("a"), 0, 10, KvOutcome::Put), done(2, "k", KvOp::Get, 5, 50, got(Some("z")))],
            "k",
        );
    }

    #[test]
    fn lost_update_two_cas_swapping_from_the_same_value_is_not_linearizable() {
        let ops = [
            done(1, "k", put("a"), 0, 10, KvOutcome::Put),
            done(2, "k", cas(Some("a"), "b"), 20, 50, KvOutcome::Cas(true)),
            done(3, "k", cas(Some("a"), "c"), 25, 55, KvOutcome::Cas(true)),
        ];
        assert_not_linearizable(&ops, "k");
        // One of them refused is fine.
        let mut fixed = ops.clone();
        fixed[2].outcome = KvOutcome::Cas(false);
        assert_linearizable(&fixed);
    }

    #[test]
    fn unknown_put_that_is_read_took_effect() {
        assert_linearizable(&[
            done(1, "k", put("a"), 0, 10, KvOutcome::Put),
            unknown(2, "k", put("b"), 20),
            done(3, "k", KvOp::Get, 30, 40, got(Some("a"))),
            done(4, "k", KvOp::Get, 1000, 1010, got(Some("b"))),
            done(5, "k", KvOp::Get, 1020, 1030, got(Some("b"))),
        ]);
    }

    #[test]
    fn unknown_put_never_read_did_not_take_effect() {
        assert_linearizable(&[
            done(1, "k", put("a"), 0, 10, KvOutcome::Put),
            unknown(2, "k", put("b"), 20),
            done(3, "k", KvOp::Get, 30, 40, got(Some("a"))),
            done(4, "k", KvOp::Get, 1000, 1010, got(Some("a"))),
        ]);
    }

    #[test]
    fn unknown_put_read_then_old_value_again_is_not_linearizable() {
        assert_not_linearizable(
            &[
                done(1, "k", put("a"), 0, 10, KvOutcome::Put),
                unknown(2, "k", put("b"), 20),
                done(3, "k", KvOp::Get, 30, 40, got(Some("b"))),
                done(4, "k", KvOp::Get, 50, 60, got(Some("a"))),
            ],
            "k",
        );
    }

    #[test]
    fn unknown_op_cannot_take_effect_before_its_call() {
        assert_not_linearizable(
            &[done(1, "k", KvOp::Get, 0, 10, got(Some("b"))), unknown(2, "k", put("b"), 20)],
            "k",
        );
    }

    #[test]
    fn refused_cas_explained_only_by_an_unknown_put_is_linearizable() {
        // Nothing reads "b", but the refused CAS needs the value not to be "a": the unknown
        // put must not be dropped as unobservable.
        assert_linearizable(&[
            done(1, "k", put("a"), 0, 10, KvOutcome::Put),
            unknown(2, "k", put("b"), 20),
            done(3, "k", cas(Some("a"), "c"), 30, 40, KvOutcome::Cas(false)),
        ]);
    }

    #[test]
    fn unknown_cas_that_is_read_took_effect_only_if_it_could_swap() {
        let ops = [
            done(1, "k", put("a"), 0, 10, KvOutcome::Put),
            unknown(2, "k", cas(Some("a"), "b"), 20),
            done(3, "k", KvOp::Get, 30, 40, got(Some("b"))),
        ];
        assert_linearizable(&ops);
        let mut wrong_expected = ops.clone();
        wrong_expected[1].op = cas(Some("x"), "b");
        assert_not_linearizable(&wrong_expected, "k");
    }

    #[test]
    fn unknown_deletes_may_each_take_effect_or_not() {
        assert_linearizable(&[
            done(1, "k", put("a"), 0, 10, KvOutcome::Put),
            unknown(2, "k", KvOp::Delete, 20),
            unknown(3, "k", KvOp::Delete, 25),
            done(4, "k", KvOp::Get, 30, 40, got(Some("a"))),
            done(5, "k", put("b"), 50, 60, KvOutcome::Put),
            done(6, "k", KvOp::Get, 70, 80, got(None)),
            done(7, "k", put("c"), 90, 100, KvOutcome::Put),
            done(8, "k", KvOp::Get, 110, 120, got(None)),
            done(9, "k", put("d"), 130, 140, KvOutcome::Put),
            done(10, "k", KvOp::Get, 150, 160, got(Some("d"))),
        ]);
        // Three absences to explain and only two unknown deletes.
        assert_not_linearizable(
            &[
                done(1, "k", put("a"), 0, 10, KvOutcome::Put),
                unknown(2, "k", KvOp::Delete, 20),
                unknown(3, "k", KvOp::Delete, 25),
                done(5, "k", put("b"), 50, 60, KvOutcome::Put),
                done(6, "k", KvOp::Get, 70, 80, got(None)),
                done(7, "k", put("c"), 90, 100, KvOutcome::Put),
                done(8, "k", KvOp::Get, 110, 120, got(None)),
                done(9, "k", put("d"), 130, 140, KvOutcome::Put),
                done(10, "k", KvOp::Get, 150, 160, got(None)),
            ],
            "k",
        );
    }

    #[test]
    fn delete_then_get_returns_absent() {
        let ops = [
            done(1, "k", put("a"), 0, 10, KvOutcome::Put),
            done(2, "k", KvOp::Delete, 20, 30, KvOutcome::Delete),
            done(3, "k", KvOp::Get, 40, 50, got(None)),
        ];
        assert_linearizable(&ops);
        let mut stale = ops.clone();
        stale[2].outcome = got(Some("a"));
        assert_not_linearizable(&stale, "k");
    }

    #[test]
    fn cas_on_an_absent_key_expecting_absent_swaps() {
        let ops = [
            done(1, "k", cas(None, "a"), 0, 10, KvOutcome::Cas(true)),
            done(2, "k", KvOp::Get, 20, 30, got(Some("a"))),
            done(3, "k", cas(None, "b"), 40, 50, KvOutcome::Cas(false)),
            done(4, "k", KvOp::Delete, 60, 70, KvOutcome::Delete),
            done(5, "k", cas(None, "c"), 80, 90, KvOutcome::Cas(true)),
            done(6, "k", KvOp::Get, 100, 110, got(Some("c"))),
        ];
        assert_linearizable(&ops);
        let mut refused_on_absent = ops.clone();
        refused_on_absent[0].outcome = KvOutcome::Cas(false);
        assert_not_linearizable(&refused_on_absent, "k");
    }

    #[test]
    fn many_keys_where_only_one_is_bad_names_that_key() {
        let mut ops = Vec::new();
        let mut id = 0;
        for key in ["a", "b", "c", "d", "e"] {
            for round in 0..20u64 {
                let value = format!("{key}{round}");
                let base = round * 100;
                id += 1;
                ops.push(done(id, key, put(&value), base, base + 10, KvOutcome::Put));
                id += 1;
                let seen = if key == "c" && round == 13 { "c11" } else { value.as_str() };
                ops.push(done(id, key, KvOp::Get, base + 20, base + 30, got(Some(seen))));
            }
        }
        let detail = assert_not_linearizable(&ops, "c");
        assert!(!detail.contains("key \"a\""), "{detail}");
        // The shortest failing prefix ends at the bad read, so later ops are not listed.
        assert!(detail.contains("get -> \"c11\""), "{detail}");
        assert!(!detail.contains("put \"c14\""), "{detail}");
    }

    #[test]
    fn failure_detail_is_capped() {
        let mut ops = Vec::new();
        for round in 0..200u64 {
            let base = round * 100;
            ops.push(done(2 * round, "k", put(&format!("v{round}")), base, base + 10, KvOutcome::Put));
            let seen = if round == 150 { "v3".to_string() } else { format!("v{round}") };
            ops.push(done(2 * round + 1, "k", KvOp::Get, base + 20, base + 30, got(Some(&seen))));
        }
        let detail = assert_not_linearizable(&ops, "k");
        assert!(detail.lines().count() <= DETAIL_OPS_MAX + 8, "{detail}");
        assert!(detail.contains("earlier ops omitted"), "{detail}");
        assert!(detail.contains("op 301 client 301 [15020us, 15030us] get -> \"v3\""), "{detail}");
    }

    #[test]
    fn large_sequential_history_is_linearizable_within_few_steps() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut model: BTreeMap<String, Value> = BTreeMap::new();
        let mut ops = Vec::new();
        let mut now_us = 0;
        for id in 0..5000u64 {
            let key = format!("key{}", rng.random_range(0..5));
            let current = model.get(&key).cloned().flatten();
            let value = bytes(&format!("value{id}"));
            let (op, outcome) = match rng.random_range(0..4) {
                0 => (KvOp::Put { value: value.clone() }, KvOutcome::Put),
                1 => (KvOp::Get, KvOutcome::Get(current.clone())),
                2 => (KvOp::Delete, KvOutcome::Delete),
                _ => {
                    let expected = if rng.random_bool(0.5) { current.clone() } else { None };
                    let swapped = expected == current;
                    (KvOp::Cas { expected, new: value.clone() }, KvOutcome::Cas(swapped))
                }
            };
            let next = match (&op, &outcome) {
                (KvOp::Put { .. }, _) | (KvOp::Cas { .. }, KvOutcome::Cas(true)) => Some(value),
                (KvOp::Delete, _) => None,
                _ => current,
            };
            model.insert(key.clone(), next);
            ops.push(Operation {
                id,
                client: id % 8,
                key: bytes(&key),
                op,
                call_us: now_us,
                return_us: Some(now_us + 5),
                outcome,
            });
            now_us += 10;
        }
        let started = Instant::now();
        // A sequential history needs about two steps per op.
        assert_eq!(check_history(&ops, 3000), Verdict::Linearizable);
        eprintln!("5000 sequential ops checked in {:?}", started.elapsed());
    }

    /// A history of `clients` concurrent clients over `keys` keys, made by placing every op's
    /// effect at a random point of its interval, so it is linearizable by construction.
    /// Puts, deletes and CASes have an unknown outcome with probability `unknown_ratio`; such
    /// an op takes effect, at some point after its call, with probability one half.
    fn generate_history(
        seed: u64,
        keys: u64,
        clients: u64,
        ops_per_client: u64,
        unknown_ratio: f64,
    ) -> Vec<Operation> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut points: Vec<(Option<u64>, Operation)> = Vec::new();
        let mut written: BTreeMap<Vec<u8>, Vec<Vec<u8>>> = BTreeMap::new();
        for client in 0..clients {
            let mut now_us = rng.random_range(0..100);
            for n in 0..ops_per_client {
                let call_us = now_us + rng.random_range(0..50);
                let return_us = call_us + rng.random_range(1..200);
                now_us = return_us;
                let key = bytes(&format!("k{}", rng.random_range(0..keys)));
                let value = bytes(&format!("c{client}n{n}"));
                let recent = written.entry(key.clone()).or_default();
                let op = match rng.random_range(0..10) {
                    0..3 => KvOp::Put { value: value.clone() },
                    3..6 => KvOp::Get,
                    6 => KvOp::Delete,
                    _ => {
                        let back = rng.random_range(1..4);
                        let expected = recent.len().checked_sub(back).map(|i| recent[i].clone());
                        KvOp::Cas { expected, new: value.clone() }
                    }
                };
                if op != KvOp::Get && op != KvOp::Delete {
                    recent.push(value);
                }
                let id = client * ops_per_client + n;
                let mut operation = Operation {
                    id,
                    client,
                    key,
                    op,
                    call_us,
                    return_us: Some(return_us),
                    outcome: KvOutcome::Unknown,
                };
                let point_us = if operation.op != KvOp::Get && rng.random_bool(unknown_ratio) {
                    operation.return_us = None;
                    rng.random_bool(0.5).then(|| call_us + rng.random_range(0..2000))
                } else {
                    Some(rng.random_range(call_us..=return_us))
                };
                points.push((point_us, operation));
            }
        }
        outcomes_at_points(points)
    }

    /// Runs the ops in the order of their points against a register per key, and records the
    /// outcome of those that return; ops without a point never take effect.
    fn outcomes_at_points(mut points: Vec<(Option<u64>, Operation)>) -> Vec<Operation> {
        points.sort_by_key(|(point_us, operation)| (*point_us, operation.id));
        let mut model: BTreeMap<Vec<u8>, Value> = BTreeMap::new();
        let mut ops = Vec::new();
        for (point_us, mut operation) in points {
            if point_us.is_some() {
                let current = model.entry(operation.key.clone()).or_default();
                let outcome = match &operation.op {
                    KvOp::Put { value } => {
                        *current = Some(value.clone());
                        KvOutcome::Put
                    }
                    KvOp::Get => KvOutcome::Get(current.clone()),
                    KvOp::Delete => {
                        *current = None;
                        KvOutcome::Delete
                    }
                    KvOp::Cas { expected, new } => {
                        let swapped = current == expected;
                        if swapped {
                            *current = Some(new.clone());
                        }
                        KvOutcome::Cas(swapped)
                    }
                };
                if operation.return_us.is_some() {
                    operation.outcome = outcome;
                }
            }
            ops.push(operation);
        }
        ops.sort_by_key(|operation| operation.id);
        ops
    }

    /// Makes one read in the middle of `ops` return a value that a completed put wrote before
    /// another completed write, itself completed before the read: a stale read, which no
    /// linearization explains since every written value is unique. Returns the read's key.
    fn inject_stale_read(ops: &mut [Operation]) -> Vec<u8> {
        let is_write =
            |o: &Operation| matches!(o.outcome, KvOutcome::Put | KvOutcome::Delete | KvOutcome::Cas(true));
        let mut reads: Vec<usize> =
            (0..ops.len()).filter(|&i| matches!(ops[i].outcome, KvOutcome::Get(_))).collect();
        reads.sort_by_key(|&i| ops[i].call_us);
        for &read in &reads[reads.len() / 2..] {
            let key = ops[read].key.clone();
            let before = |o: &Operation, us: u64| o.key == key && o.return_us.is_some_and(|r| r < us);
            let Some(overwrite) =
                ops.iter().filter(|o| is_write(o) && before(o, ops[read].call_us)).max_by_key(|o| o.call_us)
            else {
                continue;
            };
            let stale = ops.iter().find_map(|o| match (&o.op, &o.outcome) {
                (KvOp::Put { value }, KvOutcome::Put) if before(o, overwrite.call_us) => Some(value.clone()),
                _ => None,
            });
            let Some(stale) = stale else { continue };
            if ops[read].outcome != KvOutcome::Get(Some(stale.clone())) {
                ops[read].outcome = KvOutcome::Get(Some(stale));
                return key;
            }
        }
        panic!("no read to make stale");
    }

    #[test]
    fn generated_concurrent_histories_with_unknown_outcomes_are_linearizable() {
        for seed in 0..20 {
            let ops = generate_history(seed, 5, 12, 250, 0.1);
            let started = Instant::now();
            let verdict = check_history(&ops, STEPS_MAX);
            assert_eq!(verdict, Verdict::Linearizable, "seed {seed}: {verdict:#?}");
            if seed == 0 {
                eprintln!("{} concurrent ops checked in {:?}", ops.len(), started.elapsed());
            }
        }
    }

    #[test]
    fn generated_concurrent_histories_with_a_stale_read_are_caught() {
        for seed in 0..20 {
            let mut ops = generate_history(seed, 5, 12, 250, 0.1);
            let key = inject_stale_read(&mut ops);
            let started = Instant::now();
            match check_history(&ops, STEPS_MAX) {
                Verdict::NotLinearizable { key: bad, detail } => {
                    assert_eq!(bad, key, "seed {seed}: {detail}");
                    if seed == 0 {
                        eprintln!(
                            "{} ops, stale read found in {:?}:\n{detail}",
                            ops.len(),
                            started.elapsed()
                        );
                    }
                }
                verdict => panic!("seed {seed}: {verdict:#?}"),
            }
        }
    }

    #[test]
    fn one_hot_key_with_ten_concurrent_clients_is_decided() {
        for seed in 0..4 {
            let mut ops = generate_history(seed, 1, 10, 60, 0.1);
            assert_linearizable(&ops);
            let key = inject_stale_read(&mut ops);
            assert_not_linearizable(&ops, std::str::from_utf8(&key).expect("utf-8 key"));
        }
    }

    /// `count` puts of distinct values, all overlapping, then a read of a value none wrote:
    /// refuting it means trying every subset of the puts.
    fn overlapping_puts_then_bad_read(count: u64) -> Vec<Operation> {
        let mut ops: Vec<Operation> =
            (0..count).map(|i| done(i, "k", put(&format!("v{i}")), i, 1000 + i, KvOutcome::Put)).collect();
        ops.push(done(count, "k", KvOp::Get, 2000, 2010, got(Some("never written"))));
        ops
    }

    #[test]
    fn step_limit_makes_a_hard_history_inconclusive() {
        let ops = overlapping_puts_then_bad_read(14);
        match check_history(&ops, 1000) {
            Verdict::Inconclusive { key, detail } => {
                assert_eq!(key, bytes("k"));
                assert!(detail.contains("gave up after 1000 steps"), "{detail}");
            }
            verdict => panic!("{verdict:#?}"),
        }
        // With room enough the same history is refuted.
        let started = Instant::now();
        assert_not_linearizable(&overlapping_puts_then_bad_read(10), "k");
        eprintln!("10 overlapping puts refuted in {:?}", started.elapsed());
    }

    #[test]
    fn violation_on_one_key_wins_over_an_inconclusive_key() {
        let mut ops = overlapping_puts_then_bad_read(14);
        ops.push(done(100, "z", put("a"), 0, 10, KvOutcome::Put));
        ops.push(done(101, "z", KvOp::Get, 20, 30, got(None)));
        match check_history(&ops, 1000) {
            Verdict::NotLinearizable { key, .. } => assert_eq!(key, bytes("z")),
            verdict => panic!("{verdict:#?}"),
        }
    }

    #[test]
    fn unknown_get_is_ignored() {
        assert_linearizable(&[done(1, "k", put("a"), 0, 10, KvOutcome::Put), unknown(2, "k", KvOp::Get, 20)]);
    }

    #[test]
    #[should_panic(expected = "does not answer")]
    fn outcome_of_the_wrong_kind_panics() {
        check_history(&[done(1, "k", KvOp::Get, 0, 10, KvOutcome::Put)], STEPS_MAX);
    }

    /// The definition, searched exhaustively with none of the checker's rules: some order of
    /// a subset of the ops, holding every op with a known outcome, respects real time and the
    /// register. Single key, up to 64 ops; failed (placed ops, value) pairs are remembered, so
    /// it handles a dozen ops or so.
    fn brute_force_linearizable(ops: &[Operation]) -> bool {
        fn extend(
            ops: &[Operation],
            placed: u64,
            value: &Value,
            failed: &mut BTreeSet<(u64, Value)>,
        ) -> bool {
            let known_pending = |j: usize| placed & (1 << j) == 0 && ops[j].outcome != KvOutcome::Unknown;
            if !(0..ops.len()).any(known_pending) {
                return true;
            }
            if failed.contains(&(placed, value.clone())) {
                return false;
            }
            for i in 0..ops.len() {
                // Every known op that returned before this call must already be placed.
                let blocked = (0..ops.len())
                    .any(|j| known_pending(j) && ops[j].return_us.is_some_and(|r| r < ops[i].call_us));
                if placed & (1 << i) != 0 || blocked {
                    continue;
                }
                let next = match (&ops[i].op, &ops[i].outcome) {
                    (KvOp::Put { value }, _) => Some(Some(value.clone())),
                    (KvOp::Delete, _) => Some(None),
                    (KvOp::Get, KvOutcome::Get(read)) => (read == value).then(|| value.clone()),
                    (KvOp::Get, _) => Some(value.clone()),
                    (KvOp::Cas { expected, new }, outcome) => {
                        let swaps = expected == value;
                        match outcome {
                            KvOutcome::Cas(swapped) if *swapped != swaps => None,
                            _ => Some(if swaps { Some(new.clone()) } else { value.clone() }),
                        }
                    }
                };
                if next.is_some_and(|next| extend(ops, placed | (1 << i), &next, failed)) {
                    return true;
                }
            }
            failed.insert((placed, value.clone()));
            false
        }
        assert!(ops.len() <= 64);
        extend(ops, 0, &None, &mut BTreeSet::new())
    }

    /// A random single-key history of up to `ops_max` ops over three values, with random
    /// outcomes: mostly not linearizable, with collisions of values on purpose.
    fn random_small_history(rng: &mut ChaCha8Rng, ops_max: u64) -> Vec<Operation> {
        let pick = |rng: &mut ChaCha8Rng| -> Value {
            [None, Some(bytes("a")), Some(bytes("b")), Some(bytes("c"))][rng.random_range(0..4)].clone()
        };
        let count = rng.random_range(1..=ops_max);
        (0..count)
            .map(|id| {
                let call_us = rng.random_range(0..60);
                let return_us = call_us + rng.random_range(0..30);
                let new = pick(rng).unwrap_or_else(|| bytes("a"));
                let (op, outcome) = match rng.random_range(0..4) {
                    0 => (KvOp::Put { value: new }, KvOutcome::Put),
                    1 => (KvOp::Get, KvOutcome::Get(pick(rng))),
                    2 => (KvOp::Delete, KvOutcome::Delete),
                    _ => (KvOp::Cas { expected: pick(rng), new }, KvOutcome::Cas(rng.random_bool(0.5))),
                };
                let mut operation = done(id, "k", op, call_us, return_us, outcome);
                if operation.op != KvOp::Get && rng.random_bool(0.3) {
                    operation.outcome = KvOutcome::Unknown;
                    operation.return_us = None;
                }
                operation
            })
            .collect()
    }

    #[test]
    fn agrees_with_brute_force_on_random_small_histories() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut linearizable_count = 0;
        for case in 0..20_000 {
            let ops = random_small_history(&mut rng, if case % 4 == 0 { 14 } else { 7 });
            let expected = brute_force_linearizable(&ops);
            let verdict = check_history(&ops, STEPS_MAX);
            assert_eq!(verdict == Verdict::Linearizable, expected, "case {case}: {verdict:#?}\n{ops:#?}");
            assert!(!matches!(verdict, Verdict::Inconclusive { .. }));
            linearizable_count += u32::from(expected);
        }
        // Both verdicts are well represented.
        assert!((3000..17_000).contains(&linearizable_count), "{linearizable_count}");
    }

    #[test]
    fn agrees_with_brute_force_on_generated_histories_with_one_outcome_changed() {
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        for seed in 0..3000 {
            let mut ops = generate_history(seed, 1, 3, 3 + seed % 3, 0.3);
            if seed % 2 == 1 {
                let victim = rng.random_range(0..ops.len());
                ops[victim].outcome = match &ops[victim].outcome {
                    KvOutcome::Get(_) => KvOutcome::Get(
                        [None, Some(bytes("c0n0")), Some(bytes("c1n1"))][rng.random_range(0..3)].clone(),
                    ),
                    KvOutcome::Cas(swapped) => KvOutcome::Cas(!swapped),
                    outcome => outcome.clone(),
                };
            }
            let expected = brute_force_linearizable(&ops);
            let verdict = check_history(&ops, STEPS_MAX);
            assert_eq!(verdict == Verdict::Linearizable, expected, "seed {seed}: {verdict:#?}\n{ops:#?}");
        }
    }
}
