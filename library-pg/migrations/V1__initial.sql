-- roe's expert library in PostgreSQL, schema version 1.
--
-- Applied by roe itself at start (refinery, under an advisory lock so that replicas starting
-- together migrate once); refinery records it in refinery_schema_history. Never edit this
-- file once released: refinery refuses a database whose applied migration differs from the
-- binary's. Changes go in V2__*.sql and later.
--
-- Expert ids are COLLATE "C" everywhere: ordering by id is then byte order, the order the
-- sled store lists experts in, and the same on every server whatever its locale.

-- The library's singleton row. Every write transaction begins with
--   UPDATE library_meta SET head_seq = head_seq + 1 RETURNING head_seq
-- whose row lock serialises writers across all replicas until they commit, so change log
-- seqs are gapless and committed in seq order (a bigserial is neither: its values are handed
-- out at insert, not at commit, so a follower reading "seq > last" could pass over a lower
-- seq that commits later, and a rolled-back insert leaves a gap).
CREATE TABLE library_meta (
    id         boolean PRIMARY KEY DEFAULT true CHECK (id),
    -- The encoder that embedded the stored instances (NULL until roe first opens the
    -- library); vectors from another encoder would route nonsense.
    encoder_id text,
    head_seq   bigint  NOT NULL DEFAULT 0 CHECK (head_seq >= 0)
);
INSERT INTO library_meta DEFAULT VALUES;

-- Ids of instance vectors: unique for the life of the database (a sequence never goes
-- back, not even when the transaction that drew a value rolls back).
CREATE SEQUENCE point_ids AS bigint START 1;

-- PEFT adapters, content-addressed: sha256 is the SHA-256 of the adapter's config JSON
-- followed by its safetensors bytes (PeftAdapter::sha256_hex, an expert's weights_sha256),
-- so versions and experts holding the same adapter share one copy, and two adapters with
-- the same weights but another config (another LoRA alpha) are two rows. An adapter row
-- lives as long as an expert_versions row references it.
CREATE TABLE adapters (
    sha256      bytea  PRIMARY KEY CHECK (length(sha256) = 32),
    config_json text   NOT NULL,
    -- Length of the safetensors bytes: what the chunks must add up to.
    bytes       bigint NOT NULL CHECK (bytes >= 0)
);

-- The safetensors bytes in 1 MiB chunks (idx 0, 1, ...): no row near bytea's 1 GB limit,
-- and no single huge value to build in memory on either side of the connection.
CREATE TABLE adapter_chunks (
    sha256 bytea   NOT NULL REFERENCES adapters (sha256) ON DELETE CASCADE,
    idx    integer NOT NULL CHECK (idx >= 0),
    data   bytea   NOT NULL,
    PRIMARY KEY (sha256, idx)
);
-- Out of line, uncompressed: safetensors weights do not compress, trying costs CPU.
ALTER TABLE adapter_chunks ALTER COLUMN data SET STORAGE EXTERNAL;

-- Every version of every live expert, kept when a newer version replaces it (history; the
-- change log refers to them). Only the current version keeps its adapter: a superseded
-- version's adapter_sha256 is set NULL by the write that supersedes it, and adapters no
-- version references are deleted in that same transaction. A delete removes the expert's
-- versions too. A version number written again (only a writer passing Expect::Any can do
-- that; the library always writes current + 1) replaces its row.
CREATE TABLE expert_versions (
    expert_id      text COLLATE "C" NOT NULL,
    version        bigint NOT NULL CHECK (version >= 1),
    -- ExpertMeta.weights_sha256, hex.
    content_sha256 text   NOT NULL,
    adapter_sha256 bytea  REFERENCES adapters (sha256),
    -- ExpertMeta as written with this version (roe's serde JSON).
    meta           jsonb  NOT NULL,
    -- The change log seq of the write that created (or last rewrote) this version.
    created_seq    bigint NOT NULL,
    PRIMARY KEY (expert_id, version)
);
-- For "is this adapter still referenced" when a write removes adapters.
CREATE INDEX expert_versions_by_adapter ON expert_versions (adapter_sha256)
    WHERE adapter_sha256 IS NOT NULL;

-- The live head of each expert id.
CREATE TABLE experts (
    id              text COLLATE "C" PRIMARY KEY,
    current_version bigint NOT NULL,
    -- The current ExpertMeta, num_instances included (appends update it).
    meta            jsonb  NOT NULL,
    -- What the expert counts against max_library_bytes (the library's count of its
    -- adapter and instances).
    stored_bytes    bigint NOT NULL CHECK (stored_bytes >= 0),
    FOREIGN KEY (id, current_version) REFERENCES expert_versions (expert_id, version)
);

-- The task instances of the live experts, with their embeddings. A write that replaces an
-- expert deletes its old instances; an append adds rows at the current version.
CREATE TABLE instances (
    point_id         bigint PRIMARY KEY,
    expert_id        text COLLATE "C" NOT NULL,
    version          bigint NOT NULL,
    -- The seq of the change that added the row (a put's or an append's): how a follower
    -- finds the rows a change added.
    added_seq        bigint NOT NULL,
    -- roe's Instance (input, target, choices) as serde JSON.
    instance         jsonb  NOT NULL,
    -- f32 little-endian, 4 bytes a dimension.
    embedding        bytea  NOT NULL,
    -- Embedding of the choice_instance text; NULL when the instance has no choices (both
    -- text formats share `embedding`).
    choice_embedding bytea
);
CREATE INDEX instances_by_expert ON instances (expert_id, point_id);
CREATE INDEX instances_by_seq ON instances (added_seq);

-- One row per committed write, seq = library_meta.head_seq after it. Kept whole: a replica
-- that was away for any time catches up from its last applied seq.
CREATE TABLE change_log (
    seq            bigint PRIMARY KEY CHECK (seq >= 1),
    op             text   NOT NULL CHECK (op IN ('put', 'append', 'delete')),
    expert_id      text COLLATE "C" NOT NULL,
    -- The expert's version after the change (a delete: the version removed).
    version        bigint NOT NULL,
    -- The expert's ExpertMeta after the change; NULL for a delete.
    meta           jsonb,
    -- Point ids the change removed (the replaced version's instances, or the deleted
    -- expert's), ascending.
    removed_points bigint[] NOT NULL DEFAULT '{}',
    at             timestamptz NOT NULL DEFAULT now(),
    CHECK ((op = 'delete') = (meta IS NULL))
);

-- The library-wide quotas' counters, read FOR UPDATE and updated in every write's
-- transaction, so replicas writing at once cannot pass a quota together.
CREATE TABLE quota_counters (
    id            boolean PRIMARY KEY DEFAULT true CHECK (id),
    experts       bigint  NOT NULL DEFAULT 0 CHECK (experts >= 0),
    library_bytes bigint  NOT NULL DEFAULT 0 CHECK (library_bytes >= 0)
);
INSERT INTO quota_counters DEFAULT VALUES;

-- Training jobs shared by replicas (not used yet): a worker claims a queued job, or one
-- whose lease lapsed, with FOR UPDATE SKIP LOCKED and renews its lease while it trains.
CREATE TABLE training_jobs (
    id               text  PRIMARY KEY,
    -- JobSpec.
    spec             jsonb NOT NULL,
    -- The training Instances.
    rows             jsonb NOT NULL,
    state            text  NOT NULL
        CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    -- JobStatus.
    status           jsonb NOT NULL,
    -- The replica holding the lease.
    owner            text,
    lease_until      timestamptz,
    cancel_requested boolean NOT NULL DEFAULT false,
    submitted_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX training_jobs_claimable ON training_jobs (submitted_at)
    WHERE state IN ('queued', 'running');

CREATE TABLE checkpoints (
    job_id text   NOT NULL REFERENCES training_jobs (id) ON DELETE CASCADE,
    step   bigint NOT NULL,
    data   bytea  NOT NULL,
    PRIMARY KEY (job_id, step)
);
