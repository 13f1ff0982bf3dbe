/**
 * Frame types of ngx-chat protocol version 1 (docs/PROTOCOL.md).
 * Clients must ignore fields they do not know: every type is open.
 */

/** Message ids are decimal strings of 64-bit integers: keep them strings. */
export type MessageId = string;
/** `d:<a>:<b>` (a <= b byte-wise) or `g:<group id>`. */
export type ConvId = string;

export interface Media {
  url: string;
  mime: string;
  size: number;
}

// ---- client frames (PROTOCOL 6) -------------------------------------------

export interface SendFrame {
  type: "send";
  client_id: string;
  to?: string;
  group?: string;
  body: string;
  kind?: "text" | "media";
  media?: Media;
}
export interface AckFrame { type: "ack"; cursor: number }
export interface ReadFrame { type: "read"; conv: ConvId; seq: number }
export interface TypingFrame { type: "typing"; to?: string; group?: string }
export interface WatchFrame { type: "watch" | "unwatch"; users: string[] }
export interface PingFrame { type: "ping" }
export type ClientFrame = SendFrame | AckFrame | ReadFrame | TypingFrame | WatchFrame | PingFrame;

// ---- server frames (PROTOCOL 7) -------------------------------------------

export interface HelloFrame {
  type: "hello";
  user: string;
  device: string;
  cursor: number;
  heartbeat: number;
  behind?: boolean;
}

/** Answer to a send: the message has its seq and is durably queued. */
export interface SendAck {
  type: "ack";
  client_id: string;
  id: MessageId;
  conv: ConvId;
  seq: number;
  ts: number;
}

/** A message, as pushed (with `cursor`) or read from history (without). */
export interface MsgEvent {
  type: "msg";
  cursor?: number;
  id: MessageId;
  conv: ConvId;
  seq: number;
  from: string;
  to?: string;
  group?: string;
  body: string;
  kind: "text" | "media";
  media?: Media;
  ts: number;
}

export interface ReceiptEvent {
  type: "receipt";
  cursor?: number;
  conv: ConvId;
  status: "delivered" | "read";
  by: string;
  seq: number;
  ts: number;
}

/** A message deleted for everyone or for me (PROTOCOL 19.3); durable. */
export interface DeletedEvent {
  type: "deleted";
  cursor?: number;
  for: "everyone" | "me";
  id: string;
  conv: ConvId;
  seq: number;
  by: string;
  sent: number;
  ts: number;
}

export interface GroupEvent {
  type: "group";
  cursor?: number;
  id: string;
  conv: ConvId;
  seq: number;
  group: string;
  event: "created" | "added" | "removed" | string;
  members: string[];
  by: string;
  ts: number;
  /** group state after the change, when the server includes it */
  owner?: string;
  name?: string;
}

export interface PresenceFrame {
  type: "presence";
  user: string;
  online: boolean;
  last_seen: number | null;
}

export interface TypingEvent { type: "typing"; conv: ConvId; from: string }

export type ErrorCode =
  | "bad_request" | "unauthorized" | "forbidden" | "not_found" | "too_large"
  | "rate_limited" | "unavailable" | "conflict" | string;

export interface ErrorFrame {
  type: "error";
  code: ErrorCode;
  message: string;
  client_id?: string;
  retry_after?: number;
}

export interface ReconnectFrame { type: "reconnect" }
export interface PongFrame { type: "pong" }

export type DurableEvent = MsgEvent | ReceiptEvent | GroupEvent;
export type ServerFrame =
  | HelloFrame | SendAck | MsgEvent | ReceiptEvent | GroupEvent | DeletedEvent | PresenceFrame
  | TypingEvent | ErrorFrame | ReconnectFrame | PongFrame;

// ---- HTTP answers (PROTOCOL 11, 12, 17) -----------------------------------

export interface PollAnswer {
  events: ServerFrame[];
  cursor: number;
  behind?: boolean;
}

export interface HistoryPage {
  messages: (MsgEvent | GroupEvent)[];
  next_before?: number | null;
  next_after?: number | null;
}

export interface ConversationSummary {
  conv: ConvId;
  last_seq: number;
  read_seq: number;
  unread: number;
  last: MsgEvent | null;
  group?: string;
  name?: string;
}

export interface GroupInfo {
  group: string;
  name: string;
  owner: string;
  members: string[];
}

export interface ReceiptsAnswer {
  conv: ConvId;
  seq: number;
  delivered: string[];
  read: string[];
  /** direct conversations: the other participant's pointers */
  pointers?: Record<string, { delivered: number; read: number }>;
}

/** The canonical direct conversation of two users (PROTOCOL 4.1). */
export function directConv(a: string, b: string): ConvId {
  // byte order: compare as UTF-8 code units; ids are ASCII
  return a <= b ? `d:${a}:${b}` : `d:${b}:${a}`;
}

/** The other participant of a direct conversation, or null for a group. */
export function peerOf(conv: ConvId, me: string): string | null {
  if (!conv.startsWith("d:")) return null;
  const [, a, b] = conv.split(":");
  return a === me ? b : a;
}

/** Error codes after which resending the same frame cannot succeed. */
export const FINAL_SEND_ERRORS: ReadonlySet<string> =
  new Set(["too_large", "forbidden", "conflict", "bad_request", "not_found"]);
