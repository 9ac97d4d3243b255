//! Every Redis key of the product is built here, behind one prefix, so tests and environments
//! never collide and a reader can see the whole keyspace at a glance.
//!
//! **Slots (Redis Cluster).** A Lua script may only touch keys of one hash slot, and Redis Cluster
//! puts a key in the slot of its `{hash tag}` (CRC16 of the tag, mod 16384; [`slot`]). So every
//! key a script uses carries the same tag:
//!
//! | tag | keys | scripts |
//! | --- | --- | --- |
//! | `{<scheduleId>}` | `queue:{s}:waiting`, `:active`, `:seq`, `:waiting:opens` | queue `ENTER`, `TOUCH`, `ADMIT` |
//! | `{<shard>}` | `sched:{n}:due`, `:inflight`, `:payload`, `:cancelled:<reservationId>` | scheduler `CLAIM`, `REARM` (scheduling), `ACK`, `CANCEL` |
//! | `{ranking}` | `{ranking}:schedules`, `:built`, `:counted`, `:refunded` | ranking `COUNT_ONCE`, `UNCOUNT_ONCE` |
//!
//! Keys used alone (`queue:schedules`, `queue:admission-lock`) need no tag. The test
//! `every_script_touches_one_slot` computes the slot of every key of every script.

use uuid::Uuid;

/// Builds Redis key names under a prefix (for example `booking:`).
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self { prefix: prefix.into() }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// ZSET userId -> arrival sequence: the users waiting for one schedule.
    pub fn queue_waiting(&self, schedule: Uuid) -> String {
        format!("{}queue:{{{schedule}}}:waiting", self.prefix)
    }
    /// ZSET userId -> idle deadline (ms): the users allowed to book one schedule.
    pub fn queue_active(&self, schedule: Uuid) -> String {
        format!("{}queue:{{{schedule}}}:active", self.prefix)
    }
    /// Counter giving each new entrant of a schedule's queue its arrival sequence.
    pub fn queue_seq(&self, schedule: Uuid) -> String {
        format!("{}queue:{{{schedule}}}:seq", self.prefix)
    }
    /// Opening time (ms) of one schedule's booking; admission waits for it.
    pub fn queue_opens(&self, schedule: Uuid) -> String {
        format!("{}:opens", self.queue_waiting(schedule))
    }
    /// ZSET userId -> arrival sequence: users who entered before booking opened, waiting for the
    /// one draw that orders them (see `queue`); deleted by that draw.
    pub fn queue_early(&self, schedule: Uuid) -> String {
        format!("{}queue:{{{schedule}}}:early", self.prefix)
    }
    /// ZSET userId -> hard deadline (ms): when an active place lapses whatever the user does.
    pub fn queue_active_limit(&self, schedule: Uuid) -> String {
        format!("{}queue:{{{schedule}}}:active-limit", self.prefix)
    }
    /// HASH of a schedule's admission: operator settings (`paused`, `batch`, `maxActive`) that
    /// override the flags, and counters (`admitted`, `drawn`).
    pub fn queue_admission(&self, schedule: Uuid) -> String {
        format!("{}queue:{{{schedule}}}:admission", self.prefix)
    }
    /// LIST of the queue's notifications not yet committed in PostgreSQL, in the order they
    /// happened: `position:userId:entry:position` for a new entrant's `QUEUE_POSITION`,
    /// `userId:activation` for an admitted user's `QUEUE_ACTIVATED`. An item leaves only after
    /// that commit.
    pub fn queue_pending_notifications(&self, schedule: Uuid) -> String {
        format!("{}queue:{{{schedule}}}:pending-notifications", self.prefix)
    }
    /// SET of schedules that have a queue, walked by the admission tick.
    pub fn queue_schedules(&self) -> String {
        format!("{}queue:schedules", self.prefix)
    }
    /// Lease naming the one api instance that runs admission ticks.
    pub fn queue_admission_lock(&self) -> String {
        format!("{}queue:admission-lock", self.prefix)
    }

    /// ZSET reservationId -> expiresAt (ms): holds waiting for their expiry, one set per shard.
    pub fn sched_due(&self, shard: i32) -> String {
        format!("{}sched:{{{shard}}}:due", self.prefix)
    }
    /// ZSET reservationId -> lease deadline (ms): claimed, not yet acknowledged by Kafka.
    pub fn sched_inflight(&self, shard: i32) -> String {
        format!("{}sched:{{{shard}}}:inflight", self.prefix)
    }
    /// HASH reservationId -> payload JSON of the expiration message.
    pub fn sched_payload(&self, shard: i32) -> String {
        format!("{}sched:{{{shard}}}:payload", self.prefix)
    }
    /// Marker that a hold was paid or cancelled, so a late `reservation.created` does not re-add it.
    /// One per shard (in the shard's slot), as the `REARM` script of that shard reads it.
    pub fn sched_cancelled(&self, shard: i32, reservation: Uuid) -> String {
        format!("{}sched:{{{shard}}}:cancelled:{reservation}", self.prefix)
    }

    /// ZSET scheduleId -> confirmed seats.
    pub fn ranking(&self) -> String {
        format!("{}{{ranking}}:schedules", self.prefix)
    }
    /// Marker that the ranking is complete in this Redis; missing after a flush or a restart
    /// without data, which makes the worker rebuild the ranking from PostgreSQL. (Renamed when
    /// the sets below became sorted sets, so an upgraded Redis is rebuilt once.)
    pub fn ranking_built(&self) -> String {
        format!("{}{{ranking}}:built-2", self.prefix)
    }
    /// ZSET payment id -> paid at (ms): payments already counted (exactly-once increments),
    /// pruned after the ranking's retention.
    pub fn ranking_counted(&self) -> String {
        format!("{}{{ranking}}:counted-at", self.prefix)
    }
    /// ZSET payment id -> refunded at (ms): refunds already applied (exactly-once decrements),
    /// pruned after the ranking's retention.
    pub fn ranking_refunded(&self) -> String {
        format!("{}{{ranking}}:refunded-at", self.prefix)
    }
}

/// The Redis Cluster hash slot of `key`: CRC16/XMODEM of its hash tag (the text between the first
/// `{` and the next `}`, if not empty; else the whole key), mod 16384.
pub fn slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &bytes[open + 1..];
        rest.iter().position(|&b| b == b'}').filter(|&close| close > 0).map(|close| &rest[..close])
    });
    crc16_xmodem(tagged.unwrap_or(bytes)) % 16384
}

fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis_cluster_keyslot() {
        // Values printed by `CLUSTER KEYSLOT` on Redis 7.
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("bar"), 5061);
        assert_eq!(slot("123456789"), 12739);
        assert_eq!(slot("{user1000}.following"), slot("user1000"));
        assert_eq!(slot("foo{}{bar}"), slot("foo{}{bar}"), "an empty tag means the whole key");
        assert_ne!(slot("foo{}{bar}"), slot("bar"));
        assert_eq!(slot("foo{{bar}}zap"), slot("{bar"));
    }

    /// Every script of the product, with the keys it is given (built by the same functions the
    /// modules call): all keys of one invocation must hash to one slot, or Redis Cluster refuses
    /// it with CROSSSLOT.
    #[test]
    fn every_script_touches_one_slot() {
        let keys = Keys::new("booking:");
        let schedule = Uuid::new_v4();
        let reservation = Uuid::new_v4();
        let mut scripts: Vec<(String, Vec<String>)> = crate::queue::script_keys(&keys, schedule);
        for shard in 0..crate::kafka::PARTITIONS {
            scripts.extend(crate::scheduler::script_keys(&keys, shard, &[reservation, Uuid::new_v4()]));
        }
        scripts.extend(crate::ranking::script_keys(&keys));
        assert!(scripts.len() >= 9, "every script is listed");
        for (script, used) in &scripts {
            assert!(!used.is_empty(), "{script}: no keys");
            let slots: Vec<u16> = used.iter().map(|k| slot(k)).collect();
            assert!(slots.iter().all(|s| *s == slots[0]), "{script} touches several slots: {used:?} -> {slots:?}");
        }
        // The scheduler shards are spread over distinct slots (so over the cluster's masters).
        let shard_slots: std::collections::BTreeSet<u16> = (0..crate::kafka::PARTITIONS).map(|s| slot(&keys.sched_due(s))).collect();
        assert_eq!(shard_slots.len(), crate::kafka::PARTITIONS as usize);
    }
}
