// The Redux state of one room: {messages: [{id, text, author}], topic}.
// Messages are kept sorted by id (a Logux id, "<ms> <node> <seq>") and
// de-duplicated, so every tab and every user that has the same actions has
// the same state, whatever order they arrived in.

export const initialState = { messages: [], topic: '' }

function byId(a, b) {
  return a.id < b.id ? -1 : a.id > b.id ? 1 : 0
}

export function reducer(state = initialState, action) {
  switch (action.type) {
    case 'room/message':
      if (state.messages.some(m => m.id === action.id)) return state
      return {
        ...state,
        messages: [...state.messages, { id: action.id, text: action.text, author: action.author }].sort(byId)
      }
    case 'room/topic':
      return { ...state, topic: action.topic }
    case 'room/clear':
      // Denied by the server's rules: the client shows it at once, and
      // @logux/redux takes it back when logux/undo arrives.
      return { ...state, messages: [] }
    default:
      return state
  }
}
