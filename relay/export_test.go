package relay

// PresenceKey is the first key of the relays' presence lock, for tests.
const PresenceKey = presenceKey
