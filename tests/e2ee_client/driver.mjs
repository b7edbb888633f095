// One simulated human Matrix client: matrix-js-sdk with its Rust crypto (the code Element runs),
// driven over JSON lines. Nobody in this project wrote its crypto: that is the point.
//
// Protocol (stdin -> stdout, one JSON object per line):
//   request  {"id": <any>, "cmd": "<name>", "args": {...}}
//   response {"id": <same>, "ok": true, "result": ...}
//        or  {"id": <same>, "ok": false, "error": {"type": "...", "message": "..."}}
// Every request gets exactly one response, errors included; requests run concurrently. Every
// command is bounded by a deadline (args.timeout_ms, else DEFAULT_TIMEOUT_MS), so nothing hangs.
// Logs (the SDK's and ours) go to stderr only: stdout carries the protocol and nothing else.
// End of stdin or the "stop" command stops the client and exits.

import { createCipheriv, createHash, randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import { createInterface } from "node:readline";

// Keep the real stdout for the protocol, then send every console method to stderr: the SDK and
// the Rust crypto log through console, and one stray line on stdout would break the protocol.
// The Rust crypto logs at debug level whatever we ask; its debug lines (and their source
// locations) only when E2EE_CLIENT_LOG=debug, so a failing test's stderr tail stays readable.
const LOG_LEVEL = process.env.E2EE_CLIENT_LOG || "info";
const writeProtocol = process.stdout.write.bind(process.stdout);
for (const method of ["log", "info", "debug", "trace", "warn", "error"]) {
    const quiet = LOG_LEVEL !== "debug" && LOG_LEVEL !== "trace" && (method === "debug" || method === "trace");
    console[method] = (...parts) => {
        if (quiet) return;
        const text = parts.map(String).join(" ").replace(/\n\s+at \/home\/runner\/\.cargo\/[^\n]*/g, "");
        process.stderr.write(`${new Date().toISOString()} [${method}] ${text}\n`);
    };
}

// Imported only now, after console is redirected (static imports would run first).
const sdk = await import("matrix-js-sdk");
const { logger } = await import("matrix-js-sdk/lib/logger.js");
const cryptoApi = await import("matrix-js-sdk/lib/crypto-api/index.js");
logger.setLevel(LOG_LEVEL);

const DEFAULT_TIMEOUT_MS = 30_000;
const MAX_LINE_CHARS = 1_000_000;

class CommandError extends Error {
    constructor(type, message) {
        super(message);
        this.type = type;
    }
}

let client = null; // the MatrixClient, once logged in
let stopping = false;

// "Something may have changed, look again": waiters re-check their condition on every
// timeline, decryption, state or sync event (and on a short poll, for state held by the Rust
// crypto that emits nothing, such as a room's encryption settings).
let changeWaiters = [];
function notifyChange() {
    const waiters = changeWaiters;
    changeWaiters = [];
    for (const wake of waiters) wake();
}
function nextChange(ms) {
    return new Promise((resolve) => {
        const timer = setTimeout(resolve, ms);
        changeWaiters.push(() => {
            clearTimeout(timer);
            resolve();
        });
    });
}

/** Re-evaluate `check` until it returns a value other than undefined, or the deadline passes. */
async function waitFor(deadline, what, check) {
    for (;;) {
        const value = await check();
        if (value !== undefined) return value;
        const left = deadline - Date.now();
        if (left <= 0) throw new CommandError("timeout", `timed out waiting for ${what}`);
        await nextChange(Math.min(left, 250));
    }
}

// Every message-like event the client has seen, per room, in arrival order.
const seen = new Map(); // room_id -> MatrixEvent[]
function remember(event) {
    const type = event.getWireType();
    if (type !== "m.room.message" && type !== "m.room.encrypted") return;
    const roomId = event.getRoomId();
    if (!seen.has(roomId)) seen.set(roomId, []);
    const events = seen.get(roomId);
    if (!events.includes(event)) events.push(event);
    notifyChange();
}

function requireClient() {
    if (client === null) throw new CommandError("not_logged_in", "login first");
    return client;
}

function requireString(args, name) {
    const value = args[name];
    if (typeof value !== "string" || value === "") {
        throw new CommandError("bad_request", `${name} must be a non-empty string`);
    }
    return value;
}

function optionalString(args, name) {
    const value = args[name];
    if (value === undefined || value === null) return null;
    if (typeof value !== "string") throw new CommandError("bad_request", `${name} must be a string`);
    return value;
}

// EventShieldReason in crypto-api/index.d.ts (not exported by the package's entry point).
const SHIELD_REASONS = [
    "unknown",
    "unverified_identity",
    "unsigned_device",
    "unknown_device",
    "authenticity_not_guaranteed",
    "mismatched_sender_key",
    "sent_in_clear",
    "verification_violation",
];

async function describe(event) {
    const content = event.getContent();
    const wire = event.getWireContent();
    let shield = null;
    if (event.isEncrypted() && !event.isDecryptionFailure()) {
        const info = await client.getCrypto().getEncryptionInfoForEvent(event);
        if (info !== null) {
            shield = {
                colour: ["none", "grey", "red"][info.shieldColour] ?? String(info.shieldColour),
                reason: info.shieldReason === null ? null : (SHIELD_REASONS[info.shieldReason] ?? String(info.shieldReason)),
            };
        }
    }
    return {
        event_id: event.getId(),
        sender: event.getSender(),
        type: event.getType(),
        body: typeof content.body === "string" ? content.body : null,
        msgtype: typeof content.msgtype === "string" ? content.msgtype : null,
        content,
        encrypted: event.isEncrypted(),
        decryption_failure: event.isDecryptionFailure(),
        decryption_failure_reason: event.decryptionFailureReason ?? null,
        // As clients read it, and as it travelled (for encrypted events the spec keeps the
        // relation outside the ciphertext).
        relates_to: event.getRelation() ?? null,
        wire_relates_to: wire["m.relates_to"] ?? null,
        // The thread the SDK puts the event in (its m.thread relation, or the thread model's).
        thread_root_id: event.threadRootId ?? null,
        sender_device_id: wire.device_id ?? null,
        shield,
        origin_server_ts: event.getTs(),
    };
}

/** The room's settled events: sent (no local echo in flight), decryption attempted, deduplicated. */
function settled(roomId) {
    const out = [];
    const ids = new Set();
    for (const event of seen.get(roomId) ?? []) {
        const id = event.getId();
        if (event.status !== null || id === undefined || id.startsWith("~")) continue;
        if (event.isBeingDecrypted() || event.shouldAttemptDecryption()) continue;
        if (ids.has(id)) continue;
        ids.add(id);
        out.push(event);
    }
    return out;
}

async function roomEncrypted(roomId) {
    return await requireClient().getCrypto().isEncryptionEnabledInRoom(roomId);
}

/** Wait until this client knows the room as joined and, if the server says it is encrypted,
 *  until the Rust crypto has the room's encryption settings (else the SDK sends in clear). */
async function waitUntilReadyToSend(roomId, deadline) {
    const c = requireClient();
    await waitFor(deadline, `room ${roomId} to be joined in this client`, () =>
        c.getRoom(roomId)?.getMyMembership() === "join" ? true : undefined,
    );
    let serverSaysEncrypted;
    try {
        await c.getStateEvent(roomId, "m.room.encryption", "");
        serverSaysEncrypted = true;
    } catch (error) {
        if (error?.errcode !== "M_NOT_FOUND") throw error;
        serverSaysEncrypted = false;
    }
    if (serverSaysEncrypted) {
        await waitFor(deadline, `the room's encryption to be enabled in the client`, async () =>
            (await roomEncrypted(roomId)) ? true : undefined,
        );
    }
    return serverSaysEncrypted;
}

async function markDirect(userId, roomId) {
    const c = requireClient();
    const current = c.getAccountData("m.direct")?.getContent() ?? {};
    const rooms = Array.isArray(current[userId]) ? current[userId] : [];
    if (rooms.includes(roomId)) return;
    await c.setAccountData("m.direct", { ...current, [userId]: [...rooms, roomId] });
}

// Interactive verifications this client requested, by a local id.
const verifications = new Map();
let nextVerificationId = 1;
const PHASES = { 1: "unsent", 2: "requested", 3: "ready", 4: "started", 5: "cancelled", 6: "done" };
const phaseName = (phase) => PHASES[phase] ?? String(phase);

function requireVerification(args) {
    const id = requireString(args, "id");
    const entry = verifications.get(id);
    if (entry === undefined) throw new CommandError("bad_request", `no verification ${id}`);
    return [id, entry];
}

function trackVerification(request) {
    const id = String(nextVerificationId++);
    const entry = { request, sas: null, verifyDone: false, verifyError: null, cancelledWith: null };
    verifications.set(id, entry);
    request.on(cryptoApi.VerificationRequestEvent.Change, () => notifyChange());
    return describeVerification(id, entry);
}

function describeVerification(id, entry) {
    const request = entry.request;
    const sas = entry.sas?.sas ?? null;
    return {
        id,
        transaction_id: request.transactionId ?? null,
        phase: phaseName(request.phase),
        // `methods` is not implemented by the Rust crypto's request: ask about SAS instead.
        other_supports_sas: request.otherPartySupportsMethod("m.sas.v1"),
        cancellation_code: request.cancellationCode ?? null,
        cancelling_user_id: request.cancellingUserId ?? null,
        emoji: sas?.emoji?.map(([symbol, name]) => name) ?? null,
        decimals: sas?.decimal ?? null,
        verify_done: entry.verifyDone,
        verify_error: entry.verifyError,
        cancelled_with: entry.cancelledWith,
    };
}

const ENCRYPTION_STATE = {
    type: "m.room.encryption",
    state_key: "",
    content: { algorithm: "m.megolm.v1.aes-sha2" },
};

const commands = {
    async login(args, deadline) {
        if (client !== null) throw new CommandError("bad_request", "already logged in");
        const baseUrl = requireString(args, "homeserver");
        const user = requireString(args, "user");
        const password = requireString(args, "password");
        const deviceId = optionalString(args, "device_id");
        const anonymous = sdk.createClient({ baseUrl });
        const login = await anonymous.loginRequest({
            type: "m.login.password",
            identifier: { type: "m.id.user", user },
            password,
            ...(deviceId === null ? {} : { device_id: deviceId }),
            initial_device_display_name: optionalString(args, "display_name") ?? "e2ee test client",
        });
        const c = sdk.createClient({
            baseUrl,
            userId: login.user_id,
            deviceId: login.device_id,
            accessToken: login.access_token,
        });
        // No IndexedDB in Node: the crypto store lives in memory, for this process only.
        await c.initRustCrypto({ useIndexedDB: false });
        c.on(sdk.RoomEvent.Timeline, (event) => remember(event));
        // Our own message in a thread the SDK has no model of yet is in no timeline it emits:
        // its local echo is the one sign of it (settled() waits for it to be sent).
        c.on(sdk.RoomEvent.LocalEchoUpdated, (event) => remember(event));
        c.on(sdk.MatrixEventEvent.Decrypted, () => notifyChange());
        c.on(sdk.RoomStateEvent.Events, () => notifyChange());
        c.on(sdk.ClientEvent.Sync, () => notifyChange());
        c.on(sdk.ClientEvent.Room, () => notifyChange());
        client = c;
        // Threads as Element shows them (a thread model per root) only when asked: the
        // other tests read every event from the main timeline.
        await c.startClient({ initialSyncLimit: 20, threadSupport: args.thread_support === true });
        await waitFor(deadline, "the first sync", () =>
            c.isInitialSyncComplete() ? true : undefined,
        );
        const keys = await c.getCrypto().getOwnDeviceKeys();
        return {
            user_id: login.user_id,
            device_id: login.device_id,
            ed25519: keys.ed25519,
            curve25519: keys.curve25519,
        };
    },

    async create_encrypted_dm(args, deadline) {
        // As Element makes a direct chat with someone whose devices publish keys.
        const c = requireClient();
        const invitee = requireString(args, "invitee");
        const { room_id } = await c.createRoom({
            preset: "trusted_private_chat",
            is_direct: true,
            invite: [invitee],
            visibility: "private",
            initial_state: [ENCRYPTION_STATE],
        });
        await markDirect(invitee, room_id);
        return { room_id };
    },

    async create_room(args) {
        const c = requireClient();
        const encrypted = args.encrypted === true;
        const invite = Array.isArray(args.invite) ? args.invite : [];
        const { room_id } = await c.createRoom({
            preset: "private_chat",
            visibility: "private",
            name: optionalString(args, "name") ?? undefined,
            invite,
            initial_state: encrypted ? [ENCRYPTION_STATE] : [],
        });
        return { room_id };
    },

    async invite(args) {
        await requireClient().invite(requireString(args, "room_id"), requireString(args, "user_id"));
        return {};
    },

    async join(args, deadline) {
        // Joins an invite (or a room by id); a direct-chat invite is recorded in m.direct,
        // as Element does when the invitee accepts.
        const c = requireClient();
        const roomId = requireString(args, "room_id");
        await waitFor(deadline, `an invite to ${roomId}`, () =>
            c.getRoom(roomId) !== null || args.wait_for_invite === false ? true : undefined,
        );
        const room = c.getRoom(roomId);
        const invite = room?.getMember(c.getUserId())?.events.member;
        const directWith = invite?.getContent().is_direct === true ? invite.getSender() : null;
        await c.joinRoom(roomId);
        if (directWith) await markDirect(directWith, roomId);
        await waitFor(deadline, `the join of ${roomId} to sync`, () =>
            c.getRoom(roomId)?.getMyMembership() === "join" ? true : undefined,
        );
        return { room_id: roomId, direct_with: directWith };
    },

    async leave(args) {
        await requireClient().leave(requireString(args, "room_id"));
        return {};
    },

    async send_text(args, deadline) {
        const c = requireClient();
        const roomId = requireString(args, "room_id");
        const body = requireString(args, "body");
        const encrypted = await waitUntilReadyToSend(roomId, deadline);
        const msgtype = optionalString(args, "msgtype") ?? "m.text";
        // With `thread_id` the SDK adds the thread relation itself, as Element's thread
        // composer does (is_falling_back, and m.in_reply_to the thread's latest event
        // when the client models the thread).
        const threadId = optionalString(args, "thread_id");
        const { event_id } = await c.sendEvent(roomId, threadId, "m.room.message", { msgtype, body });
        return { event_id, encrypted };
    },

    async redact(args) {
        // The person deletes an event, as Element's "Remove" does; returns the
        // redaction's own event id. The redaction is never encrypted (the spec keeps it
        // in the clear), in an encrypted room too.
        const c = requireClient();
        const roomId = requireString(args, "room_id");
        const eventId = requireString(args, "event_id");
        const reason = optionalString(args, "reason");
        const opts = reason === null ? undefined : { reason };
        const { event_id } = await c.redactEvent(roomId, eventId, undefined, opts);
        return { event_id };
    },

    async send_encrypted_attachment(args, deadline) {
        // An attachment as Element sends one into an encrypted room (the spec's "Sending
        // encrypted attachments", what matrix-encrypt-attachment does): AES-256-CTR with a
        // random key and a random IV whose counter half (last 8 bytes) is zero, the
        // ciphertext uploaded as application/octet-stream without its name, the SHA-256 of
        // the ciphertext and the key in the event's `file`, which the megolm session then
        // encrypts with the rest. `data_base64` is the file; with `tamper` one bit of the
        // ciphertext is flipped after hashing (what a server or a proxy could do to it).
        const c = requireClient();
        const roomId = requireString(args, "room_id");
        const data = Buffer.from(requireString(args, "data_base64"), "base64");
        const msgtype = optionalString(args, "msgtype") ?? "m.file";
        const body = requireString(args, "body");
        const filename = optionalString(args, "filename");
        const mimetype = optionalString(args, "mimetype");
        const encrypted = await waitUntilReadyToSend(roomId, deadline);
        const key = randomBytes(32);
        const iv = Buffer.concat([randomBytes(8), Buffer.alloc(8)]);
        const cipher = createCipheriv("aes-256-ctr", key, iv);
        const ciphertext = Buffer.concat([cipher.update(data), cipher.final()]);
        const sha256 = createHash("sha256").update(ciphertext).digest("base64").replace(/=+$/, "");
        const uploaded = Buffer.from(ciphertext);
        if (args.tamper === true) uploaded[uploaded.length - 1] ^= 0x01;
        const { content_uri } = await c.uploadContent(new Blob([uploaded]), {
            type: "application/octet-stream",
            includeFilename: false,
        });
        const file = {
            v: "v2",
            url: content_uri,
            key: {
                kty: "oct",
                key_ops: ["encrypt", "decrypt"],
                alg: "A256CTR",
                k: key.toString("base64url"),
                ext: true,
            },
            iv: iv.toString("base64").replace(/=+$/, ""),
            hashes: { sha256 },
        };
        const info = { size: data.length, ...(mimetype === null ? {} : { mimetype }) };
        const content = { msgtype, body, info, file, ...(filename === null ? {} : { filename }) };
        const { event_id } = await c.sendEvent(roomId, null, "m.room.message", content);
        return { event_id, encrypted, file };
    },

    async wait_for_message(args, deadline) {
        // The first settled message in the room (already seen or still to come) from `sender`
        // (any sender when absent) whose body contains `body_contains` (any message, including
        // undecryptable ones, when absent), that is not in `exclude_event_ids` and, with
        // `in_reply_to`, whose m.relates_to has m.in_reply_to that event.
        requireClient();
        const roomId = requireString(args, "room_id");
        const sender = optionalString(args, "sender");
        const contains = optionalString(args, "body_contains");
        const inReplyTo = optionalString(args, "in_reply_to");
        const exclude = new Set(Array.isArray(args.exclude_event_ids) ? args.exclude_event_ids : []);
        const what = `a message in ${roomId}${sender ? ` from ${sender}` : ""}${
            contains === null ? "" : ` containing ${JSON.stringify(contains)}`
        }${inReplyTo === null ? "" : ` in reply to ${inReplyTo}`}`;
        const event = await waitFor(deadline, what, () =>
            settled(roomId).find((event) => {
                if (exclude.has(event.getId())) return false;
                if (sender !== null && event.getSender() !== sender) return false;
                if (inReplyTo !== null && event.replyEventId !== inReplyTo) return false;
                if (contains === null) return true;
                const body = event.getContent().body;
                return !event.isDecryptionFailure() && typeof body === "string" && body.includes(contains);
            }),
        );
        return await describe(event);
    },

    async messages(args) {
        requireClient();
        const roomId = requireString(args, "room_id");
        const out = [];
        for (const event of settled(roomId)) out.push(await describe(event));
        return out;
    },

    async room_encrypted(args) {
        return await roomEncrypted(requireString(args, "room_id"));
    },

    async devices(args) {
        // The devices of a user as this client's crypto knows them (fetched when not tracked).
        const c = requireClient();
        const userId = requireString(args, "user_id");
        const map = await c.getCrypto().getUserDeviceInfo([userId], true);
        const devices = [];
        for (const device of (map.get(userId) ?? new Map()).values()) {
            // Whether the owner's self-signing key signed it (cross-signing), as this
            // client's crypto checked it; null when it cannot tell.
            const status = await c.getCrypto().getDeviceVerificationStatus(userId, device.deviceId);
            devices.push({
                device_id: device.deviceId,
                ed25519: device.getFingerprint() ?? null,
                curve25519: device.getIdentityKey() ?? null,
                display_name: device.displayName ?? null,
                verified: device.verified === 1, // DeviceVerification.Verified
                algorithms: device.algorithms,
                signed_by_owner: status?.signedByOwner ?? false,
            });
        }
        devices.sort((a, b) => a.device_id.localeCompare(b.device_id));
        return devices;
    },

    async bootstrap_cross_signing(args) {
        // The person's own cross-signing keys (a client with "exclude insecure devices"
        // refuses to encrypt without them), uploaded with the password when asked.
        const c = requireClient();
        const password = requireString(args, "password");
        await c.getCrypto().bootstrapCrossSigning({
            authUploadDeviceSigningKeys: async (makeRequest) => {
                await makeRequest({
                    type: "m.login.password",
                    identifier: { type: "m.id.user", user: c.getUserId() },
                    password,
                });
            },
        });
        return { ready: await c.getCrypto().isCrossSigningReady() };
    },

    async set_device_isolation(args) {
        // Element's "exclude insecure devices" (MSC4153): room keys go only to devices
        // their owner cross-signed, and only events from such devices decrypt.
        const c = requireClient();
        const onlySigned = args.only_signed === true;
        c.getCrypto().setDeviceIsolationMode(
            onlySigned
                ? new cryptoApi.OnlySignedDevicesIsolationMode()
                : new cryptoApi.AllDevicesIsolationMode(false),
        );
        return { only_signed: onlySigned };
    },

    async request_device_verification(args) {
        // Element's "verify this device": an m.key.verification.request to that device
        // (the device must be known: call `devices` first). Returns the request's id here.
        const c = requireClient();
        const request = await c
            .getCrypto()
            .requestDeviceVerification(requireString(args, "user_id"), requireString(args, "device_id"));
        return trackVerification(request);
    },

    async request_verification_dm(args) {
        // Element's "verify user": an m.key.verification.request message in a direct chat
        // with them (the whole verification then runs in that room).
        const c = requireClient();
        const request = await c
            .getCrypto()
            .requestVerificationDM(requireString(args, "user_id"), requireString(args, "room_id"));
        return trackVerification(request);
    },

    async wait_verification(args, deadline) {
        // Until the request reaches one of `phases` (names of VerificationPhase, lower case).
        const [id, entry] = requireVerification(args);
        const phases = Array.isArray(args.phases) ? args.phases : ["ready"];
        return await waitFor(deadline, `verification ${id} to reach ${phases.join("/")}`, () =>
            phases.includes(phaseName(entry.request.phase)) ? describeVerification(id, entry) : undefined,
        );
    },

    async start_sas(args, deadline) {
        // The user picks "verify by emoji": m.key.verification.start (m.sas.v1); waits for the
        // emoji and numbers to show (or the verification to end).
        const [id, entry] = requireVerification(args);
        const verifier = await entry.request.startVerification("m.sas.v1");
        verifier.on(cryptoApi.VerifierEvent.ShowSas, (sas) => {
            entry.sas = sas;
            notifyChange();
        });
        verifier.on(cryptoApi.VerifierEvent.Cancel, (reason) => {
            entry.cancelledWith = String(reason?.message ?? reason?.getContent?.()?.code ?? reason);
            notifyChange();
        });
        verifier.verify().then(
            () => {
                entry.verifyDone = true;
                notifyChange();
            },
            (error) => {
                entry.verifyError = String(error?.message ?? error);
                notifyChange();
            },
        );
        return await waitFor(deadline, `the SAS of verification ${id}`, () =>
            entry.sas !== null || entry.verifyError !== null || entry.request.phase === cryptoApi.VerificationPhase.Cancelled
                ? describeVerification(id, entry)
                : undefined,
        );
    },

    async confirm_sas(args, deadline) {
        // The user says the emoji match (`match` true: the MAC goes) or not (m.mismatched_sas);
        // waits for the verification to end either way.
        const [id, entry] = requireVerification(args);
        if (entry.sas === null) throw new CommandError("bad_request", "no SAS shown yet");
        if (args.match === false) entry.sas.mismatch();
        else await entry.sas.confirm();
        return await waitFor(deadline, `verification ${id} to end`, () =>
            entry.verifyDone || entry.verifyError !== null ? describeVerification(id, entry) : undefined,
        );
    },

    async verification_status(args) {
        // How this client now sees a user and one of their devices.
        const crypto = requireClient().getCrypto();
        const userId = requireString(args, "user_id");
        const deviceId = requireString(args, "device_id");
        const device = await crypto.getDeviceVerificationStatus(userId, deviceId);
        const user = await crypto.getUserVerificationStatus(userId);
        return {
            device_verified: device?.isVerified() ?? false,
            device_locally_verified: device?.localVerified ?? false,
            device_cross_signing_verified: device?.crossSigningVerified ?? false,
            device_signed_by_owner: device?.signedByOwner ?? false,
            user_verified: user.isVerified(),
            user_cross_signing_verified: user.isCrossSigningVerified(),
        };
    },

    async whoami() {
        const c = requireClient();
        return { user_id: c.getUserId(), device_id: c.getDeviceId() };
    },

    async stop() {
        stopping = true;
        return {};
    },
};

function respond(message) {
    writeProtocol(JSON.stringify(message) + "\n");
}

async function handle(line) {
    let request;
    try {
        request = JSON.parse(line);
    } catch {
        respond({ id: null, ok: false, error: { type: "bad_request", message: "not JSON" } });
        return;
    }
    const id = request?.id ?? null;
    const fail = (type, message) => respond({ id, ok: false, error: { type, message } });
    if (typeof request !== "object" || request === null || Array.isArray(request)) {
        return fail("bad_request", "a request is a JSON object");
    }
    const command = Object.hasOwn(commands, request.cmd) ? commands[request.cmd] : null;
    if (command === null) return fail("unknown_command", `unknown command ${String(request.cmd)}`);
    const args = request.args ?? {};
    if (typeof args !== "object" || Array.isArray(args)) return fail("bad_request", "args is an object");
    const timeoutMs = Number.isInteger(args.timeout_ms) && args.timeout_ms > 0
        ? args.timeout_ms
        : DEFAULT_TIMEOUT_MS;
    const deadline = Date.now() + timeoutMs;
    let timer;
    const expired = new Promise((_, reject) => {
        timer = setTimeout(
            () => reject(new CommandError("timeout", `${request.cmd} did not finish in ${timeoutMs} ms`)),
            // After the command's own deadline, so its waits report what they waited for.
            timeoutMs + 1000,
        );
    });
    try {
        const result = await Promise.race([command(args, deadline), expired]);
        respond({ id, ok: true, result: result ?? null });
    } catch (error) {
        const type = error instanceof CommandError
            ? error.type
            : error?.errcode ?? error?.name ?? "error";
        // Matrix errors carry the server's errcode; messages never hold secrets here
        // (no access token is ever put in one by the SDK).
        fail(String(type), String(error?.message ?? error));
    } finally {
        clearTimeout(timer);
    }
    if (stopping) shutdown(0);
}

function shutdown(code) {
    try {
        client?.stopClient();
    } finally {
        // Let the last response leave before exiting.
        process.stdout.write("", () => process.exit(code));
    }
}

// The first line says the SDK has loaded, with the versions under test.
const version = (name) =>
    JSON.parse(readFileSync(new URL(`./node_modules/${name}/package.json`, import.meta.url))).version;
respond({
    id: null,
    ok: true,
    result: {
        ready: true,
        node: process.version,
        "matrix-js-sdk": version("matrix-js-sdk"),
        "@matrix-org/matrix-sdk-crypto-wasm": version("@matrix-org/matrix-sdk-crypto-wasm"),
    },
});

const lines = createInterface({ input: process.stdin, crlfDelay: Infinity });
lines.on("line", (line) => {
    if (line.trim() === "") return;
    if (line.length > MAX_LINE_CHARS) {
        respond({ id: null, ok: false, error: { type: "bad_request", message: "line too long" } });
        return;
    }
    handle(line);
});
lines.on("close", () => shutdown(0));
process.on("unhandledRejection", (reason) => {
    process.stderr.write(`[unhandledRejection] ${reason?.stack ?? reason}\n`);
});
