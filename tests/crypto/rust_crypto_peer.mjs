// A matrix-rust-sdk OlmMachine (its WebAssembly build, from the E2EE client's packages)
// driven over JSON lines by tests/crypto/test_machine.py: an independent implementation
// on the other side of our OlmMachine. In: {"op": ..., ...}; out: {"ok", "result"|"error"}.
import * as sdk from "../e2ee_client/node_modules/@matrix-org/matrix-sdk-crypto-wasm/node.mjs";
import readline from "node:readline";

await sdk.initAsync();
let m = null;
const rl = readline.createInterface({ input: process.stdin });
const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const req = (r) => ({ id: r.id, type: r.type, body: JSON.parse(r.body), event_type: r.event_type, txn_id: r.txn_id });
for await (const line of rl) {
  const cmd = JSON.parse(line);
  try {
    let result = null;
    switch (cmd.op) {
      case "init":
        m = await sdk.OlmMachine.initialize(new sdk.UserId(cmd.user), new sdk.DeviceId(cmd.device));
        result = { ed25519: m.identityKeys.ed25519.toBase64(), curve25519: m.identityKeys.curve25519.toBase64() };
        break;
      case "outgoing":
        result = (await m.outgoingRequests()).map(req);
        break;
      case "mark":
        result = await m.markRequestAsSent(cmd.id, cmd.type, JSON.stringify(cmd.response));
        break;
      case "sync": {
        const counts = new Map(Object.entries(cmd.counts || {}));
        const r = await m.receiveSyncChanges(JSON.stringify(cmd.to_device), new sdk.DeviceLists((cmd.changed || []).map((u) => new sdk.UserId(u)), []), counts, new Set(cmd.fallback || []));
        result = JSON.parse(r);
        break;
      }
      case "track":
        await m.updateTrackedUsers(cmd.users.map((u) => new sdk.UserId(u)));
        break;
      case "missing": {
        const r = await m.getMissingSessions(cmd.users.map((u) => new sdk.UserId(u)));
        result = r ? req(r) : null;
        break;
      }
      case "share": {
        const s = new sdk.EncryptionSettings();
        result = (await m.shareRoomKey(new sdk.RoomId(cmd.room), cmd.users.map((u) => new sdk.UserId(u)), s)).map(req);
        break;
      }
      case "encrypt":
        result = JSON.parse(await m.encryptRoomEvent(new sdk.RoomId(cmd.room), cmd.type, JSON.stringify(cmd.content)));
        break;
      case "decrypt": {
        const d = await m.decryptRoomEvent(JSON.stringify(cmd.event), new sdk.RoomId(cmd.room), new sdk.DecryptionSettings(sdk.TrustRequirement.Untrusted));
        result = { event: JSON.parse(d.event), sender: d.sender.toString(), device: d.senderDevice ? d.senderDevice.toString() : null, curve: d.senderCurve25519Key };
        break;
      }
      case "invalidate":
        result = await m.invalidateGroupSession(new sdk.RoomId(cmd.room));
        break;
      default:
        throw new Error("unknown op " + cmd.op);
    }
    out({ ok: true, result });
  } catch (e) {
    out({ ok: false, error: String(e && e.stack || e) });
  }
}
