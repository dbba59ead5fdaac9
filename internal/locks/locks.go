// Package locks is the one list of the PostgreSQL advisory-lock keys
// mailroom takes. Each is a constant here so that no two features pick the
// same key by accident, and so that a reader of pg_locks can tell whose lock
// it is. Two-key locks take the outbox table's OID as their second key, so
// each installation (schema) has its own; the first key spells its purpose
// in ASCII.
//
//	key          form                        taken by          for
//	Migrate      one key, transaction        mailroom.Migrate  concurrent migrations take turns
//	Wake         (Wake, OID), session        relay (wake.go)   a sleeping relay; writers NOTIFY while it is held (trigger of migrations 0003/0005, which spell 1835100524)
//	Claim        (Claim, OID), transaction   relay (claim)     relays publishing at once claim in turns
//	Presence     (Presence, OID), shared     relay             every running relay; Status counts them
//	Active+i     (Active+i, OID), session    relay             publishing slot i < Config.ActiveRelays
//	Alone        (Alone, OID), session       relay             the one publishing relay claims without leases; claims hold it shared
//	Maintenance  (hash, OID), session        mailroom-relay    one sidecar purges; the hash is seeded by Maintenance and the purges it runs
//	GroupSlots+s one bigint, session         inbox.Group       member slot s of a partitioned group; the high half is a hash of the group's consumer and queue, so pg_locks shows classid = that hash, objid = GroupSlots+s
package locks

const (
	Migrate     = 0x6d61696c726f6f6d // "mailroom"
	Wake        = 1835100524         // "mail"
	Claim       = 1953853038         // "turn"
	Presence    = 1919249505         // "rela"
	Alone       = 1634496366         // "alon"
	Active      = 1633907830         // "actv"; slot i is Active+i
	MaxActive   = 64                 // slots Active … Active+MaxActive-1 are reserved
	Maintenance = 0x6d726d6e         // "mrmn"
	GroupSlots  = 0x67727000         // "grp\0"; slot s is GroupSlots+s, s < 4096
)
