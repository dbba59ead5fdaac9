package mailroom

// MigrateTo applies the pending versions up to upTo, for upgrade tests.
var MigrateTo = migrate
