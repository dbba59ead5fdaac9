package inbox

// SetAfterCommit installs a hook that runs after a message's transaction
// committed and before its ack, for fault-injection tests.
func SetAfterCommit(c *Consumer, f func(Message)) { c.afterCommit = f }
