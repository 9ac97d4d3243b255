//! Every Redis key of the product is built here, behind one prefix, so tests and environments
//! never collide and a reader can see the whole keyspace at a glance.

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
    pub fn sched_cancelled(&self, reservation: Uuid) -> String {
        format!("{}sched:cancelled:{reservation}", self.prefix)
    }

    /// ZSET scheduleId -> confirmed seats.
    pub fn ranking(&self) -> String {
        format!("{}{{ranking}}:schedules", self.prefix)
    }
    /// Marker that the ranking is complete in this Redis; missing after a flush or a restart
    /// without data, which makes the worker rebuild the ranking from PostgreSQL.
    pub fn ranking_built(&self) -> String {
        format!("{}{{ranking}}:built", self.prefix)
    }
    /// SET of payment ids already counted in the ranking (exactly-once increments).
    pub fn ranking_counted(&self) -> String {
        format!("{}{{ranking}}:counted", self.prefix)
    }
}
